"""LongBench-Chat from a made-up LongAlign checkout (our own judge prompt, cases and examples): items truncated
to the budget, the judge on a stub client under both protocols, failed items, one-line errors."""

import json
import random
import re

import pytest

from megalign.data import synthetic
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError
from megalign.eval import longbench_chat
from megalign.eval.judge import SYSTEM_PROMPT
from megalign.eval.longbench import middle_truncate
from megalign.eval.longbench_chat import Judge, longbench_chat_items
from megalign.eval.openai_client import Reply

# ours: nine positional fields, filled as LongAlign's eval.py fills its prompt_fs.txt
JUDGE_PROMPT = ("Grade an answer from 1 to 10.\nQuery: {}\nReference: {}\n"
                "Example A: {} => [[{}]]\nExample B: {} => [[{}]]\nExample C: {} => [[{}]]\n"
                "Answer to grade: {}\nEnd with your grade as [[n]].")
HEAD, TAIL = "Then read the text below.", "Set the answer here?"  # the SentencePiece fixture knows these


def _case(idx: int, words: int = 30) -> dict:
    text = synthetic.filler(random.Random(idx), words)
    return {"idx": idx, "prompt": f"{HEAD} {text} {TAIL}", "query": f"query {idx}", "answer": f"reference {idx}"}


def _shots(idx: int) -> list[dict]:
    return [{"answer": f"example {idx}{name}", "score": score} for name, score in zip("xyz", (2, 6, 9))]


def _checkout(root, cases=None, jsonl: bool = False):
    chat = root / "LongBench_Chat"
    chat.mkdir(parents=True, exist_ok=True)
    cases = cases if cases is not None else [_case(1), _case(2, words=3000), _case(3)]
    if jsonl:
        (chat / "longbench_chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    else:
        (chat / "test_cases.json").write_text(json.dumps(cases))
    (chat / "prompt_fs.txt").write_text(JUDGE_PROMPT)
    (chat / "few_shots.json").write_text(json.dumps([_shots(i) for i in range(1, 6)]))
    return root


class StubClient:
    """OpenAIClient's `chat`: replies from `reply(prompt, call number)`; records what it was sent."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def chat(self, messages, max_tokens, temperature=0.0, stop=None):
        assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT} and temperature == 0.0
        self.prompts.append(messages[1]["content"])
        return Reply(self.reply(messages[1]["content"], len(self.prompts)), "stop", None, None)


def _examples_order(prompt: str) -> list[str]:
    return re.findall(r"Example [ABC]: example \d(\w) =>", prompt)


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request):
    fixture = "bpe_tokenizer_dir" if request.param == "bpe" else "sentencepiece_model"
    return load_tokenizer(request.getfixturevalue(fixture))


# ---- items ----


def test_items_are_truncated_to_the_budget(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    items = longbench_chat_items(root, tokenizer, max_length=200)
    assert [i.id for i in items] == ["1", "2", "3"]
    assert all(i.task == "longbench-chat" and i.chat and i.max_new_tokens == 1024 for i in items)
    short, long_ = items[0], items[1]
    assert short.prompt == _case(1)["prompt"] and not short.meta["truncated"]
    assert short.references == ["reference 1"] and short.meta["query"] == "query 1" and short.meta["idx"] == 1
    assert long_.meta["truncated"] and long_.meta["input_tokens"] > 200
    # no BOS counted (LongAlign encodes with add_special_tokens=False)
    assert long_.prompt == middle_truncate(tokenizer, _case(2, words=3000)["prompt"], 200, with_bos=False)
    assert long_.prompt.startswith(HEAD) and long_.prompt.endswith(TAIL)
    assert len(tokenizer.encode_batch([long_.prompt])[0]) <= 200 + 2  # the seam may re-encode a little longer
    # the default budget is LongAlign's 64,000 tokens: nothing here is cut
    assert not any(i.meta["truncated"] for i in longbench_chat_items(root, tokenizer))


def test_items_from_jsonl_and_from_the_folder_itself(tmp_path, tokenizer):
    root = _checkout(tmp_path, cases=[_case(4)], jsonl=True)
    (item,) = longbench_chat_items(root / "LongBench_Chat", tokenizer)
    assert item.id == "4"


def test_missing_and_bad_files(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    chat = root / "LongBench_Chat"
    (chat / "test_cases.json").unlink()
    with pytest.raises(MegalignError) as error:
        longbench_chat_items(root, tokenizer)
    assert str(chat / "test_cases.json") in str(error.value) and "\n" not in str(error.value)
    (chat / "test_cases.json").write_text(json.dumps([_case(1), {"idx": 2, "prompt": "x"}]))
    with pytest.raises(MegalignError, match="case 2: no query, answer field"):
        longbench_chat_items(root, tokenizer)
    (chat / "test_cases.json").write_text(json.dumps([_case(1), _case(1)]))
    with pytest.raises(MegalignError, match="idx 1 repeats"):
        longbench_chat_items(root, tokenizer)
    for name in ("prompt_fs.txt", "few_shots.json"):
        _checkout(root)
        (chat / name).unlink()
        with pytest.raises(MegalignError) as error:
            Judge(StubClient(lambda p, n: "[[5]]"), root)
        assert str(chat / name) in str(error.value) and "\n" not in str(error.value)


# ---- the judge ----


@pytest.fixture
def items(tmp_path, word_tokenizer_dir):
    root = _checkout(tmp_path)
    return root, longbench_chat_items(root, load_tokenizer(word_tokenizer_dir))


def test_paper_protocol_shuffles_per_seed_and_averages_two_passes(items):
    root, cases = items
    client = StubClient(lambda prompt, n: "Mostly right. Rating: [[6]]" if n % 2 else "Good. [[9]]")
    judge = Judge(client, root)
    score, details = judge.judge_item(cases[0], "  my answer\nin two lines ")
    assert score == 7.5 and details["score"] == 7.5 and details["protocol"] == "paper"
    assert [p["score"] for p in details["passes"]] == [6.0, 9.0] and len(client.prompts) == 2
    first = client.prompts[0]
    assert first.startswith("Grade an answer") and "Query: query 1\nReference: reference 1\n" in first
    assert "Answer to grade: my answer\nin two lines\n" in first  # stripped, newlines kept
    # each pass shows the three examples, with their scores, in its pass's order
    for prompt, passed in zip(client.prompts, details["passes"]):
        assert sorted(passed["order"]) == [0, 1, 2]
        assert _examples_order(prompt) == ["xyz"[i] for i in passed["order"]]
        for i in passed["order"]:
            assert f"example 1{'xyz'[i]} => [[{(2, 6, 9)[i]}]]" in prompt
    # the same seed: the same orders, every run; another seed: other orders somewhere
    def orders(j: Judge) -> list[list[int]]:
        return [j.order(idx, p, 3) for idx in range(1, 6) for p in range(2)]

    assert orders(Judge(StubClient(None), root)) == orders(judge)
    assert orders(Judge(StubClient(None), root, seed=1)) != orders(judge)
    assert len({tuple(o) for o in orders(judge)}) > 1  # shuffled, not one fixed order


def test_a_reply_without_a_score_fails_the_item(items):
    root, cases = items
    client = StubClient(lambda prompt, n: "A fine answer, I would say seven.")
    score, details = Judge(client, root).judge_item(cases[0], "an answer")
    assert score is None and "no [[rating]]" in details["reason"] and "seven" in details["reason"]
    assert len(client.prompts) == longbench_chat.TRIES  # asked again, as eval.py, then given up
    records = [{"task": "longbench-chat", "status": "failed", "score": None},
               {"task": "longbench-chat", "status": "ok", "score": 8.0},
               {"task": "longbench-chat", "status": "ok", "score": 5.0}, {"task": "needle", "status": "ok", "score": 1}]
    assert longbench_chat.summary(records) == {"score": 6.5, "sum": 13.0, "items": 3, "scored": 2, "failed": 1}


def test_a_retry_can_bring_the_score(items):
    root, cases = items
    client = StubClient(lambda prompt, n: "[[4]]" if n == 2 else "[[great]]")
    score, details = Judge(client, root, passes=1).judge_item(cases[0], "an answer")
    assert score == 4.0 and details["passes"][0]["tries"] == 2


def test_an_unreachable_judge_fails_the_item(items):
    root, cases = items

    def down(prompt, n):
        raise MegalignError("cannot reach http://judge/v1/chat/completions: is the server running?")

    score, details = Judge(StubClient(down), root).judge_item(cases[0], "an answer")
    assert score is None and "cannot reach" in details["reason"]


def test_released_protocol(items):
    root, cases = items
    client = StubClient(lambda prompt, n: "[[3]]")
    judge = Judge(client, root, protocol="released")
    score, details = judge.judge_item(cases[1], "first line\nsecond line\n")
    assert score == 3.0 and len(client.prompts) == 1 and len(details["passes"]) == 1
    assert details["passes"][0]["order"] == [0, 1, 2] and _examples_order(client.prompts[0]) == ["x", "y", "z"]
    assert "Answer to grade: first line second line\n" in client.prompts[0]  # eval.py's one-line predictions
    assert "Query: query 2\nReference: reference 2\n" in client.prompts[0]
    with pytest.raises(MegalignError, match="unknown LongBench-Chat protocol 'gpt4'"):
        Judge(client, root, protocol="gpt4")


def test_a_prompt_that_does_not_fit_the_examples(items):
    root, cases = items
    (root / "LongBench_Chat" / "prompt_fs.txt").write_text("Query {} reference {} answer {}")
    with pytest.raises(MegalignError, match="has 3 {} fields; with 3 examples .* it needs 9"):
        Judge(StubClient(None), root).judge_item(cases[0], "x")
    (root / "LongBench_Chat" / "prompt_fs.txt").write_text("Query {query}")
    with pytest.raises(MegalignError, match="filled by position"):
        Judge(StubClient(None), root)
