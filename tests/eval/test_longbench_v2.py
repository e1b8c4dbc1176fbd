"""LongBench v2 from a made-up checkout (our own prompt templates and questions, nothing of LongBench's): the
placeholders, the middle truncation against pred.py's rule run with the tokenizer libraries themselves, the
answer parsing, the score, result.py's buckets and the one-line errors."""

import json
import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from megalign.data import synthetic
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError
from megalign.eval import longbench, longbench_v2
from megalign.eval.items import EvalItem
from megalign.eval.longbench_v2 import extract_answer, longbench_v2_items, middle_truncate_v2

TEMPLATE = ("Go through these pages first.\n<<\n$DOC$\n>>\nAsked: $Q$\nA) $C_A$\nB) $C_B$\nC) $C_C$\nD) $C_D$\n"
            "Say which one it is, then stop here.")
NO_CONTEXT_TEMPLATE = "Asked without pages: $Q$\nA) $C_A$ B) $C_B$ C) $C_C$ D) $C_D$\nPick one."
HEAD, TAIL = "Go through these pages first.", "then stop here."


def _record(n: int, difficulty: str = "easy", length: str = "short", answer: str = "B",
            context: str = "  Alpha was in Beta. Gamma met Delta.\n") -> dict:
    return {"_id": f"q{n}", "domain": "Single-Document QA", "sub_domain": "Novel", "difficulty": difficulty,
            "length": length, "question": f" Where was Alpha, {n}? ", "choice_A": "Gamma ", "choice_B": " Beta",
            "choice_C": "Delta", "choice_D": "nowhere", "answer": answer, "context": context}


def _checkout(root, records=None, jsonl: bool = False):
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "0shot.txt").write_text(TEMPLATE, encoding="utf-8")
    (root / "prompts" / "0shot_no_context.txt").write_text(NO_CONTEXT_TEMPLATE, encoding="utf-8")
    rows = records if records is not None else [_record(n) for n in range(3)]
    if jsonl:
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        (root / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request):
    fixture = "bpe_tokenizer_dir" if request.param == "bpe" else "sentencepiece_model"
    return load_tokenizer(request.getfixturevalue(fixture))


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# ---- items ----


def test_placeholders_are_filled_with_stripped_fields(tmp_path, tokenizer):
    root = _checkout(tmp_path / "LongBench")
    items = longbench_v2_items(root, tokenizer, 10_000)
    assert [i.id for i in items] == ["q0", "q1", "q2"] and {i.task for i in items} == {"longbench-v2"}
    item = items[1]
    assert item.prompt == ("Go through these pages first.\n<<\nAlpha was in Beta. Gamma met Delta.\n>>\n"
                           "Asked: Where was Alpha, 1?\nA) Gamma\nB) Beta\nC) Delta\nD) nowhere\n"
                           "Say which one it is, then stop here.")
    assert item.references == ["B"] and item.max_new_tokens == 128 and item.chat and item.stop_strings == ()
    assert item.meta == {"difficulty": "easy", "length": "short", "domain": "Single-Document QA",
                         "sub_domain": "Novel", "input_tokens": item.meta["input_tokens"], "truncated": False}
    assert longbench_v2_items(root, tokenizer, 10_000) == items  # the same inputs give the same items


def test_placeholders_are_replaced_in_turn(tmp_path, word_tokenizer_dir):
    """As pred.py's chain of replace calls: a placeholder inside the document is filled by the later fields."""
    root = _checkout(tmp_path, [_record(0, context="see $Q$ and $C_D$")])
    (item,) = longbench_v2_items(root, load_tokenizer(word_tokenizer_dir), 10_000)
    assert "<<\nsee Where was Alpha, 0? and nowhere\n>>" in item.prompt


def test_no_context(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    items = longbench_v2_items(root, tokenizer, 10_000, no_context=True)
    assert {i.task for i in items} == {"longbench-v2-no-context"}
    assert items[0].prompt == ("Asked without pages: Where was Alpha, 0?\nA) Gamma B) Beta C) Delta D) nowhere\n"
                               "Pick one.")


def test_data_file_and_jsonl(tmp_path, tokenizer):
    root = _checkout(tmp_path / "lb", [_record(5), _record(6)], jsonl=True)
    items = longbench_v2_items(root, tokenizer, 10_000, data_file=root / "data.jsonl")
    assert [i.id for i in items] == ["q5", "q6"]


# ---- the truncation ----


def test_truncation_by_hand(word_tokenizer_dir):
    """Every id known: <s> hi ' ' hello ' ' bye ' ' ok ' ' be ' ' brief is 12 tokens, the BOS included."""
    tok = load_tokenizer(word_tokenizer_dir)  # no decoder: decode joins its tokens with a space
    text = "hi hello bye ok be brief"
    assert middle_truncate_v2(tok, text, 12).text == text  # 12 tokens fit 12
    # budget 5 (odd: the tail gets the extra token): [<s> hi] + [be ' ' brief], decoded together, BOS skipped
    cut = middle_truncate_v2(tok, text, 5)
    assert cut.text == "hi be   brief" and (cut.tokens, cut.truncated) == (12, True)
    assert longbench.middle_truncate(tok, text, 5) == "hi" + "  brief"  # v1's rule keeps 2 + 2 here
    # budget 6: [<s> hi ' '] + [be ' ' brief]
    assert middle_truncate_v2(tok, text, 6).text == "hi   be   brief"
    assert middle_truncate_v2(tok, text, 1).text == "brief"  # ids[:0] + ids[-1:]
    with pytest.raises(MegalignError, match="at least 1"):
        middle_truncate_v2(tok, text, 0)


def _official(tokenizer, paths, text: str, budget: int) -> str:
    """pred.py's truncation with the tokenizer libraries as transformers drives them (BOS added, the kept ids
    decoded at once with the special tokens skipped)."""
    if tokenizer.kind == "hf":
        tok = RustTokenizer.from_file(str(paths["hf"] / "tokenizer.json"))
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
        ids = tok.encode(text).ids
    else:
        sp = spm.SentencePieceProcessor(model_file=str(paths["spm"]))
        ids = sp.encode(text, add_bos=True)
    if len(ids) <= budget:
        return text
    kept = ids[:budget // 2] + ids[-budget // 2:]  # pred.py's slices
    return tok.decode(kept, skip_special_tokens=True) if tokenizer.kind == "hf" else sp.decode(kept)


def test_long_prompt_is_cut_as_pred_py(tmp_path, tokenizer, bpe_tokenizer_dir, sentencepiece_model):
    paths = {"hf": bpe_tokenizer_dir, "spm": sentencepiece_model}
    context = f"<|im_start|> {synthetic.filler(random.Random(0), 2000)} <|im_end|>"
    record = _record(0, context=context)
    full = longbench_v2.fill_template(TEMPLATE, record)
    n = 1 + len(tokenizer.encode_batch([full])[0])
    for budget in (3, 17, 80, 81, n - 1, n):
        assert middle_truncate_v2(tokenizer, full, budget).text == _official(tokenizer, paths, full, budget), budget
    if tokenizer.kind == "sentencepiece":  # v1 decodes each half apart: the tail's leading space is lost there
        v1, v2 = longbench.middle_truncate, longbench_v2.middle_truncate_v2
        assert any(v1(tokenizer, full, b) != v2(tokenizer, full, b).text for b in range(2, 40, 2))

    (item,) = longbench_v2_items(_checkout(tmp_path, [record]), tokenizer, 81)
    assert item.prompt == _official(tokenizer, paths, full, 81)
    assert item.meta["truncated"] and item.meta["input_tokens"] == n > 81
    if tokenizer.kind == "hf":  # byte-level: every character survives, so both ends read back whole
        assert item.prompt.startswith(HEAD) and item.prompt.endswith(TAIL)
        assert "<|im_start|>" not in item.prompt  # a special token, skipped by the decode
        assert abs(len(tokenizer.encode_batch([item.prompt])[0]) - 80) <= 2  # 81 kept less the BOS; seams merge


# ---- answers and scores ----


@pytest.mark.parametrize("reply, letter", [
    ("The correct answer is (B).", "B"),
    ("**The correct answer is (C)**", "C"),  # markdown bold: the asterisks are dropped first
    ("The correct answer is **(C)**", "C"),
    ("After all that, The correct answer is D", "D"),  # the bare form
    ("The correct answer is A. No: The correct answer is (C).", "C"),  # the parenthesised form wins
    ("The correct answer is (B), not The correct answer is (A)", "B"),  # the first one
    ("The correct answer is Definitely (A)", "D"),  # nothing has to follow the letter
    ("the correct answer is (b)", None),  # case matters
    ("The correct answer is (b)", None),
    ("The correct answer is (E)", None),
    ("The correct answer is: (A)", None),
    ("The correct answer is (insert answer here)", None),
    ("Answer: B", None),
    ("", None),
])
def test_extract_answer(reply, letter):
    assert extract_answer(reply) == letter


def test_score():
    item = EvalItem(task="longbench-v2", id="q0", prompt="", references=["B"], max_new_tokens=128)
    assert longbench_v2.score(item, "The correct answer is (B)") == 1.0
    assert longbench_v2.score(item, "The correct answer is (A)") == 0.0
    assert longbench_v2.score(item, "I think it is B.") == 0.0  # no parsable answer: wrong, as pred.py


def _rec(task, difficulty, length, score, prediction="The correct answer is (A)", status="ok") -> dict:
    return {"task": task, "id": str(random.random()), "status": status, "score": score, "prediction": prediction,
            "meta": {"difficulty": difficulty, "length": length}}


def test_summary_buckets():
    v2, nc = "longbench-v2", "longbench-v2-no-context"
    records = [_rec(v2, "easy", "short", 1.0), _rec(v2, "easy", "medium", 0.0), _rec(v2, "hard", "short", 1.0),
               _rec(v2, "hard", "long", 1.0), _rec(v2, "hard", "long", 0.0, prediction="no idea"),
               _rec(v2, "easy", "short", None, prediction=None, status="failed"),
               _rec(v2, "hard", "medium", 0.0, prediction=""),  # pred.py writes nothing for an empty reply
               _rec(nc, "easy", "short", 1.0), _rec("needle", None, None, 1.0)]
    result = longbench_v2.summary(records)
    assert set(result) == {v2, nc}
    # 5 scored: 3 right; easy 1/2, hard 2/3, short 2/2, medium 0/1, long 1/2
    assert result[v2] == {"accuracy": {"Overall": 60.0, "Easy": 50.0, "Hard": 66.7, "Short": 100.0, "Medium": 0.0,
                                       "Long": 50.0},
                          "items": {"Overall": 5, "Easy": 2, "Hard": 3, "Short": 2, "Medium": 1, "Long": 2},
                          "failed": 1, "empty": 1, "no_answer": 1}
    assert result[nc]["accuracy"] == {"Overall": 100.0, "Easy": 100.0, "Hard": None, "Short": 100.0,
                                      "Medium": None, "Long": None}
    assert longbench_v2.summary([_rec("needle", None, None, 1.0)]) == {}


# ---- errors: one line, naming the file and what would work ----


def test_missing_checkout_and_prompt_file(tmp_path, tokenizer):
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(tmp_path / "nowhere", tokenizer, 10_000)
    assert str(tmp_path / "nowhere") in _one_line(error) and "LongBench checkout" in str(error.value)
    root = _checkout(tmp_path / "lb")
    (root / "prompts" / "0shot_no_context.txt").unlink()
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(root, tokenizer, 10_000, no_context=True)
    assert str(root / "prompts" / "0shot_no_context.txt") in _one_line(error) and "does not exist" in str(error.value)
    (root / "prompts" / "0shot.txt").write_text(TEMPLATE.replace("$Q$", "the question"))
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(root, tokenizer, 10_000)
    assert f"{root / 'prompts' / '0shot.txt'} has no $Q$" in _one_line(error)


def test_missing_and_malformed_data(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(root, tokenizer, 10_000, data_file=tmp_path / "other.json")
    assert str(tmp_path / "other.json") in _one_line(error) and "data_file" in str(error.value)
    (root / "data.json").write_text('[{"_id": "q0", ')
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(root, tokenizer, 10_000)
    assert f"{root / 'data.json'} is not valid JSON" in _one_line(error)
    (root / "data.jsonl").write_text(json.dumps(_record(0)) + "\n" + '{"_id": "cut sho\n')
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(root, tokenizer, 10_000, data_file=root / "data.jsonl")
    assert f"{root / 'data.jsonl'}:2: not valid JSON" in _one_line(error)


@pytest.mark.parametrize("change, message", [
    ({"answer": "E"}, "[1]: answer is 'E', not one of A, B, C, D"),
    ({"answer": "b"}, "[1]: answer is 'b', not one of A, B, C, D"),
    ({"difficulty": "medium"}, "[1]: difficulty is 'medium', not one of easy, hard"),
    ({"length": "tiny"}, "[1]: length is 'tiny', not one of short, medium, long"),
    ({"context": None}, "[1]: context is NoneType, not a string"),
    ({"answer": None, "drop": "answer"}, "[1]: no answer field"),
    ({"_id": "q0"}, "[1]: _id 'q0' repeats"),
])
def test_bad_records(tmp_path, tokenizer, change, message):
    bad = {**_record(1), **change}
    bad.pop(change.get("drop"), None)
    bad.pop("drop", None)
    root = _checkout(tmp_path, [_record(0), bad])
    with pytest.raises(MegalignError) as error:
        longbench_v2_items(root, tokenizer, 10_000)
    assert f"{root / 'data.json'}{message}" in _one_line(error)


def test_cot_is_refused(tmp_path, tokenizer):
    with pytest.raises(MegalignError, match="two generations"):
        longbench_v2_items(_checkout(tmp_path), tokenizer, 10_000, cot=True)
