"""LongBench v1 and LongBench-E from a made-up checkout (our own prompts and records, nothing of LongBench's):
the middle truncation against the official rule run with the tokenizer libraries themselves, the items, the
one-line errors, the scores through longbench_metrics and the summary."""

import json
import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from megalign.data import synthetic
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError
from megalign.eval import longbench
from megalign.eval.items import EvalItem
from megalign.eval.longbench import longbench_items, middle_truncate, middle_truncate_counted

PROMPTS = {
    "hotpotqa": "Then read the text below.\n\n{context}\n\nQuestion: {input}\nSet the answer here?",
    "trec": "Sort each question into its kind.\n{context}\n{input}",
    "samsum": "Sum the chat up in one line.\n{context}\n\nChat: {input}\nSummary:",
    "passage_count": "How many different paragraphs are there?\n{context}\nCount:",
    "lcc": "Carry on with the code.\n{context}",
}
MAXLEN = {"hotpotqa": 32, "trec": 64, "samsum": 128, "passage_count": 32, "lcc": 64}
CLASSES = ["Location", "Person", "Number"]


def _record(task: str, n: int, context: str = "Alpha was in Beta. Gamma met Delta.", length: int = 900) -> dict:
    return {"input": f"question {n} of {task}", "context": context, "answers": [f"answer{n}", "Beta"],
            "length": length, "dataset": task, "language": "en",
            "all_classes": CLASSES if task == "trec" else None, "_id": f"{task}-{n}"}


def _write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _checkout(root, suffix: str = "", records: dict | None = None):
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "config" / "dataset2prompt.json").write_text(json.dumps(PROMPTS))
    (root / "config" / "dataset2maxlen.json").write_text(json.dumps(MAXLEN))
    for task in PROMPTS:
        rows = (records or {}).get(task) or [_record(task, n) for n in range(3)]
        _write_jsonl(root / "data" / f"{task}{suffix}.jsonl", rows)
    return root


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request):
    fixture = "bpe_tokenizer_dir" if request.param == "bpe" else "sentencepiece_model"
    return load_tokenizer(request.getfixturevalue(fixture))


# ---- the truncation ----


def test_middle_truncation_by_hand(word_tokenizer_dir):
    """Every id known: <s> hi ' ' hello ' ' bye ' ' ok ' ' be ' ' brief is 12 tokens, the BOS included."""
    tok = load_tokenizer(word_tokenizer_dir)  # no decoder: decode joins its tokens with a space
    text = "hi hello bye ok be brief"
    assert middle_truncate(tok, text, 12) == text  # 12 tokens fit 12
    assert middle_truncate(tok, text, 11, with_bos=False) == text  # 11 without the BOS
    # budget 6: [<s> hi ' '] (the BOS skipped) + [be ' ' brief]
    assert middle_truncate(tok, text, 6) == "hi  " + "be   brief"
    # budget 11 (odd: 5 + 5): [<s> hi ' ' hello ' '] + [ok ' ' be ' ' brief]
    assert middle_truncate(tok, text, 11) == "hi   hello  " + "ok   be   brief"
    cut = middle_truncate_counted(tok, text, 6)
    assert (cut.tokens, cut.truncated) == (12, True)


def _official_hf(tokenizer_json: str, text: str, budget: int) -> str:
    """pred.py's rule with the Rust tokenizer as transformers drives it, for a tokenizer that adds a BOS."""
    tok = RustTokenizer.from_file(tokenizer_json)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    ids = tok.encode(text).ids  # add_special_tokens=True, the default
    if len(ids) <= budget:
        return text
    half = int(budget / 2)
    return tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)


def _official_spm(model: str, text: str, budget: int) -> str:
    """pred.py's rule with SentencePiece as a slow Llama tokenizer drives it (BOS added, control pieces dropped)."""
    sp = spm.SentencePieceProcessor(model_file=model)
    ids = sp.encode(text, add_bos=True)
    if len(ids) <= budget:
        return text
    half = int(budget / 2)
    return sp.decode(ids[:half]) + sp.decode(ids[-half:])


# Both ends in characters the small SentencePiece fixture knows (it has no q, no digits, no byte fallback).
HEAD, TAIL = "Then read the text below.", "Set the answer here?"


def _filler(n_words: int) -> str:
    return synthetic.filler(random.Random(0), n_words)


def _long_text() -> str:
    # a special token near each end: the official decode drops it (the BPE fixture marks it special)
    return f"{HEAD} <|im_start|> {_filler(300)} <|im_end|> {TAIL}"


def test_middle_truncation_is_the_official_rule(tokenizer, bpe_tokenizer_dir, sentencepiece_model):
    text = _long_text()
    n = 1 + len(tokenizer.encode_batch([text])[0])  # with the BOS

    def official(budget: int) -> str:
        if tokenizer.kind == "hf":
            return _official_hf(str(bpe_tokenizer_dir / "tokenizer.json"), text, budget)
        return _official_spm(str(sentencepiece_model), text, budget)

    for budget in (2, 3, 17, 64, n // 2 + 1, n - 1, n, n + 1):
        assert middle_truncate(tokenizer, text, budget) == official(budget), budget
    assert middle_truncate(tokenizer, text, n) == text  # exactly the budget: kept
    cut = middle_truncate(tokenizer, text, 64)
    assert cut.startswith(HEAD) and cut.endswith(TAIL)
    if tokenizer.kind == "hf":  # special there, a plain user-defined piece in SentencePiece
        assert "<|im_start|>" not in cut and "<|im_start|>" in text
    assert len(tokenizer.encode_batch([cut])[0]) <= 64 + 2  # a word may re-encode differently at the seam


def test_a_budget_below_two_keeps_nothing(tokenizer):
    with pytest.raises(MegalignError, match="at least 2"):
        middle_truncate(tokenizer, "anything", 1)


# ---- items ----


def test_items_of_a_few_tasks(tmp_path, tokenizer):
    root = _checkout(tmp_path / "LongBench")
    items = longbench_items(root, tokenizer, max_length=10_000, tasks=["hotpotqa", "trec", "samsum", "lcc"])
    tasks = ("hotpotqa", "trec", "samsum", "lcc")
    assert [i.task for i in items] == [f"longbench/{t}" for t in tasks for _ in range(3)]
    by_id = {i.id: i for i in items}
    hotpot = by_id["hotpotqa-1"]
    assert hotpot.prompt == PROMPTS["hotpotqa"].format(**_record("hotpotqa", 1))  # fits: untouched
    assert hotpot.references == ["answer1", "Beta"] and hotpot.max_new_tokens == 32 and hotpot.chat
    assert hotpot.meta["language"] == "en" and hotpot.meta["length"] == 900 and not hotpot.meta["truncated"]
    assert "bucket" not in hotpot.meta and hotpot.stop_strings == ()
    assert not by_id["trec-0"].chat and by_id["trec-0"].max_new_tokens == 64
    assert by_id["trec-0"].meta["all_classes"] == CLASSES
    assert not by_id["samsum-2"].chat and by_id["samsum-2"].stop_strings == ("\n",)
    assert not by_id["lcc-0"].chat and by_id["lcc-0"].prompt.startswith("Carry on with the code.")
    # the same inputs give the same items
    assert longbench_items(root, tokenizer, 10_000, tasks=["hotpotqa", "trec", "samsum", "lcc"]) == items


def test_a_long_prompt_is_cut_in_the_middle(tmp_path, tokenizer):
    context = _filler(2000)
    root = _checkout(tmp_path, records={"hotpotqa": [_record("hotpotqa", 0, context=context)]})
    (item,) = longbench_items(root, tokenizer, max_length=80, tasks=["hotpotqa"])
    full = PROMPTS["hotpotqa"].format(**_record("hotpotqa", 0, context=context))
    assert item.prompt == middle_truncate(tokenizer, full, 80)
    assert item.prompt.startswith(HEAD) and item.prompt.endswith(TAIL)
    assert item.meta["truncated"] and item.meta["input_tokens"] > 80


def test_the_repository_layout_is_found(tmp_path, tokenizer):
    _checkout(tmp_path / "repo" / "LongBench")  # v1 lives in LongBench/ of the repository since v2
    assert len(longbench_items(tmp_path / "repo", tokenizer, 10_000, tasks=["trec"])) == 3


def test_data_dir_overrides(tmp_path, tokenizer):
    root = _checkout(tmp_path / "lb")
    _write_jsonl(tmp_path / "elsewhere" / "trec.jsonl", [_record("trec", 7)])
    (item,) = longbench_items(root, tokenizer, 10_000, tasks=["trec"], data_dir=tmp_path / "elsewhere")
    assert item.id == "trec-7"


def test_longbench_e_buckets(tmp_path, tokenizer):
    rows = [_record("hotpotqa", n, length=length) for n, length in enumerate((1200, 3999, 4000, 7999, 12000))]
    root = _checkout(tmp_path, suffix="_e", records={"hotpotqa": rows})
    items = longbench_items(root, tokenizer, 10_000, tasks=["hotpotqa"], e=True)
    assert {i.task for i in items} == {"longbench-e/hotpotqa"}
    assert [i.meta["bucket"] for i in items] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]
    with pytest.raises(MegalignError, match="LongBench-E task 'lsht'.*known: qasper"):
        longbench_items(root, tokenizer, 10_000, tasks=["lsht"], e=True)  # not one of LongBench-E's 13


# ---- errors: one line, naming the file ----


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_missing_prompt_file(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    (root / "config" / "dataset2prompt.json").unlink()
    with pytest.raises(MegalignError) as error:
        longbench_items(root, tokenizer, 10_000, tasks=["trec"])
    text = _one_line(error)
    assert str(root / "config" / "dataset2prompt.json") in text and "LongBench checkout" in text


def test_malformed_jsonl_line(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    path = root / "data" / "hotpotqa.jsonl"
    path.write_text(json.dumps(_record("hotpotqa", 0)) + "\n" + '{"input": "cut sho\n')
    with pytest.raises(MegalignError) as error:
        longbench_items(root, tokenizer, 10_000, tasks=["hotpotqa"])
    assert f"{path}:2: not valid JSON" in _one_line(error)


def test_bad_records_and_tables(tmp_path, tokenizer):
    root = _checkout(tmp_path)
    path = root / "data" / "trec.jsonl"
    no_answers = {k: v for k, v in _record("trec", 0).items() if k != "answers"}
    _write_jsonl(path, [_record("trec", 1), no_answers])
    with pytest.raises(MegalignError, match=f"{path}:2: no answers field"):
        longbench_items(root, tokenizer, 10_000, tasks=["trec"])
    _write_jsonl(path, [_record("trec", 1), _record("trec", 1)])
    with pytest.raises(MegalignError, match="repeats line 1"):
        longbench_items(root, tokenizer, 10_000, tasks=["trec"])
    _write_jsonl(path, [{**_record("trec", 1), "all_classes": None}])
    with pytest.raises(MegalignError, match="scored against all_classes"):
        longbench_items(root, tokenizer, 10_000, tasks=["trec"])
    (root / "data" / "lcc.jsonl").unlink()
    with pytest.raises(MegalignError) as error:
        longbench_items(root, tokenizer, 10_000, tasks=["lcc"])
    assert str(root / "data" / "lcc.jsonl") in _one_line(error) and "data.zip" in str(error.value)
    (root / "config" / "dataset2maxlen.json").write_text(json.dumps({"trec": 64}))
    with pytest.raises(MegalignError, match="dataset2maxlen.json has no generation length for task 'hotpotqa'"):
        longbench_items(root, tokenizer, 10_000, tasks=["hotpotqa"])
    _write_jsonl(path, [_record("trec", 1)])
    (root / "config" / "dataset2prompt.json").write_text(json.dumps({**PROMPTS, "trec": "{context} {question}"}))
    with pytest.raises(MegalignError, match=r"the trec prompt names \{question\}"):
        longbench_items(root, tokenizer, 10_000, tasks=["trec"])


def test_unknown_task_names_the_known(tmp_path, tokenizer):
    with pytest.raises(MegalignError) as error:
        longbench_items(_checkout(tmp_path), tokenizer, 10_000, tasks=["hotpot"])
    assert "unknown LongBench task 'hotpot'" in _one_line(error) and "hotpotqa" in str(error.value)


# ---- scores ----


def _item(task: str, references: list[str], **meta) -> EvalItem:
    return EvalItem(task=task, id="x", prompt="", references=references, max_new_tokens=8, meta=meta)


def test_scores_go_through_longbench_metrics():
    assert longbench.score(_item("longbench/hotpotqa", ["Paris", "the city of Paris"]), "Paris.") == 1.0
    assert longbench.score(_item("longbench-e/hotpotqa", ["Paris"]), "Lyon") == 0.0
    trec = _item("longbench/trec", ["Location"], all_classes=CLASSES)
    assert longbench.score(trec, "\nLocation\nQuestion: who is it?\nType: Person") == 1.0  # the first line only
    assert longbench.score(_item("longbench/passage_count", ["3"]), "There are 3 or 4") == 0.5
    with pytest.raises(MegalignError, match="no LongBench task"):
        longbench.score(_item("needle", ["x"]), "x")


def _records(task: str, scores, lengths=None) -> list[dict]:
    lengths = lengths or [100] * len(scores)
    return [{"task": task, "id": str(n), "status": "failed" if s is None else "ok", "score": s,
             "meta": {"length": length}} for n, (s, length) in enumerate(zip(scores, lengths))]


def test_summary():
    records = (_records("longbench/hotpotqa", [1.0, 0.5, None]) + _records("longbench/trec", [0.0, 1.0 / 3])
               + _records("longbench/lsht", [1.0]) + _records("needle", [1.0])
               + _records("longbench-e/hotpotqa", [1.0, 0.0, 0.5, 1.0], lengths=[100, 3000, 5000, 9000]))
    result = longbench.summary(records)
    v1 = result["longbench"]
    assert v1["tasks"] == {"hotpotqa": 75.0, "trec": 16.67, "lsht": 100.0}
    assert v1["failed"] == {"hotpotqa": 1}
    assert v1["categories"] == {"Multi-Doc QA": 75.0, "Few-shot Learning": 58.34}
    assert v1["overall"] == 63.89
    assert v1["en"]["average"] == 45.84 and v1["zh"]["average"] == 100.0  # lsht is the Chinese one
    e = result["longbench-e"]
    assert e["tasks"] == {"hotpotqa": 62.5}
    assert e["buckets"] == {"hotpotqa": {"0-4k": 50.0, "4-8k": 50.0, "8k+": 100.0}}
    assert "failed" not in e
    assert longbench.summary(_records("longbench/trec", [None])) == {"longbench": {"tasks": {},
                                                                                   "failed": {"trec": 1}}}
