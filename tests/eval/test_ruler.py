"""RULER-style tasks: every prompt (plus room for the answer) fits the length in the model's tokens, holds what
its references need (the right needles, keys, chain, word counts), is deterministic for a seed; the metrics."""

import re
from collections import Counter

import pytest

from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError
from megalign.eval import ruler
from megalign.eval.haystack import NOISE, count_tokens

NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
# (needles, distinct keys, keys asked about, references)
NIAH_SHAPE = {"niah_single": (1, 1, 1, 1), "niah_multikey": (4, 4, 1, 1), "niah_multivalue": (4, 1, 1, 4),
              "niah_multiquery": (4, 4, 4, 4)}


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request):
    fixture = "bpe_tokenizer_dir" if request.param == "bpe" else "sentencepiece_model"
    return load_tokenizer(request.getfixturevalue(fixture))


def _question(prompt: str) -> str:
    return prompt[prompt.rindex("Question:"):]


@pytest.mark.parametrize("length", [700, 3000, 6000])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompt_fits_with_room_for_the_answer_and_holds_the_references(tokenizer, task, length):
    items = ruler.make_items(task, tokenizer, length, 2, seed=3)
    assert len(items) == 2 and len({i.id for i in items}) == 2
    for item in items:
        assert item.task == f"ruler/{task}" and item.max_new_tokens == ruler.MAX_NEW_TOKENS[task]
        tokens = count_tokens(tokenizer, item.prompt)
        assert tokens == item.meta["prompt_tokens"]
        assert tokens + item.max_new_tokens <= length
        assert length - (tokens + item.max_new_tokens) < 100  # the haystack grew as far as it fits
        for reference in item.references:
            assert reference in item.prompt
        _check_task_shape(task, item, length)


def _check_task_shape(task, item, length):
    prompt, meta = item.prompt, item.meta
    if task in NIAH_SHAPE:
        needles, keys, queried, references = NIAH_SHAPE[task]
        found = NEEDLE.findall(prompt)
        assert len(found) == needles and len({key for _, key, _ in found}) == keys
        assert prompt.count(NOISE) == meta["haystack_units"] > 0
        asked = [key for key in {key for _, key, _ in found} if key in _question(prompt)]
        assert len(asked) == queried and sorted(asked) == sorted(meta["queries"])
        assert len(item.references) == references
        assert sorted(item.references) == sorted(value for _, key, value in found if key in asked)
    elif task == "vt":
        chain = re.findall(r"^VAR ([A-Z]{5}) = (?:VAR )?(\S+)$", prompt, flags=re.M)
        assert len(chain) == ruler.VT_HOPS + 1
        assert [name for name, _ in chain] == item.references  # in order: each reads the one before
        assert chain[0][1] == meta["value"] and meta["value"] in _question(prompt)
        assert [source for _, source in chain[1:]] == item.references[:-1]
        assert prompt.count(NOISE) == meta["haystack_units"]
    else:
        entries = re.findall(r"(\d+)\. ([a-z]+)", prompt)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        common, other = (30, 3) if length >= 4096 else (6, 1)
        assert (meta["common_repeats"], meta["other_repeats"]) == (common, other)
        assert {w: counts[w] for w in item.references} == {w: common for w in item.references}
        assert set(counts.values()) == {common, other} and len(counts) == meta["haystack_units"]
        assert len(item.references) == ruler.CWE_COMMON


def test_uuid_needles(tokenizer):
    [item] = ruler.make_items("niah_multivalue", tokenizer, 2500, 1, value_type="uuids")
    assert len(item.references) == 4 and all(UUID.match(r) for r in item.references)
    assert all(kind == "uuids" for kind, _, _ in NEEDLE.findall(item.prompt))
    assert count_tokens(tokenizer, item.prompt) + item.max_new_tokens <= 2500


def test_same_seed_same_items(tokenizer):
    for task in ruler.TASKS:
        first = ruler.make_items(task, tokenizer, 1500, 3, seed=11)
        assert ruler.make_items(task, tokenizer, 1500, 3, seed=11) == first
        other = ruler.make_items(task, tokenizer, 1500, 3, seed=12)
        assert [i.references for i in other] != [i.references for i in first]
        assert len({i.prompt for i in first}) == 3


def test_errors_name_what_works(tokenizer):
    with pytest.raises(MegalignError, match="unknown RULER task 'niah'; known: niah_single, niah_multikey, "):
        ruler.make_items("niah", tokenizer, 1000, 1)
    with pytest.raises(MegalignError, match="unknown RULER task 'qa'"):
        ruler.score("qa", "x", ["x"])
    with pytest.raises(MegalignError, match="value_type 'words'; valid: numbers, uuids"):
        ruler.make_items("niah_single", tokenizer, 1000, 1, value_type="words")
    with pytest.raises(MegalignError, match=r"^ruler/niah_multivalue does not fit 150 tokens: its smallest prompt has "
                                            r"\d+ tokens, and the answer needs 128 more$"):
        ruler.make_items("niah_multivalue", tokenizer, 150, 1)


def test_string_match_metrics():
    refs = ["1234567", "7654321", "ABCDE"]
    assert ruler.string_match_all("the numbers: 1234567 and 7654321", refs) == pytest.approx(2 / 3)
    assert ruler.string_match_all("abcde, 7654321, 1234567", refs) == 1.0
    assert ruler.string_match_all("nothing", refs) == 0.0
    assert ruler.string_match_part("it is abcde", refs) == 1.0
    assert ruler.string_match_part("nothing", refs) == 0.0
    assert ruler.score("vt", "Answer: xyzab, QWERT", ["QWERT", "XYZAB", "MNBVC"]) == pytest.approx(2 / 3)
    assert ruler.score("niah_single", "The special magic number is 7654321.", ["7654321"]) == 1.0
    assert ruler.score("cwe", "1. water 2. river", ["water", "river", "garden", "window"]) == 0.5
    assert set(ruler.METRICS) == set(ruler.TASKS) and len(ruler.TASKS) == 6
    with pytest.raises(ValueError):
        ruler.string_match_all("x", [])
