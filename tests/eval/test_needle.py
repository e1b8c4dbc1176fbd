"""Needle grid: contexts of exactly the requested token count (the model's own tokenizer, no special tokens), the
needle at the sentence boundary at or before the requested depth, one-line errors, determinism, the heatmap."""

import json
import random

import pytest

from megalign.data import synthetic
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError
from megalign.eval import needle
from megalign.eval.haystack import EncodedText, count_tokens, read_text_files, sentence_ends
from tests.conftest import SPECIALS


def _haystack_text() -> str:
    """Filler paragraphs with quotes, brackets and non-ASCII letters (SentencePiece spans are bytes)."""
    rng = random.Random(7)
    odd = ["The café “Zur Post” opened in the spring.", "Did the naïve clerk notice?", "It rained (again)!",
           "Über den Fluss, said nobody."]
    return "\n\n".join(f"{synthetic.filler(rng, 80)} {odd[i % 4]}" for i in range(40))


HAYSTACK = _haystack_text()


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request):
    fixture = "bpe_tokenizer_dir" if request.param == "bpe" else "sentencepiece_model"
    return load_tokenizer(request.getfixturevalue(fixture))


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return EncodedText.of(tokenizer, HAYSTACK)


def _forbidden_ids(tokenizer) -> set[int]:
    """Ids of every special token the test tokenizers carry (conftest's list); not <unk>, which the tiny
    SentencePiece model gives characters it never saw (the needle's digits)."""
    ids = set()
    for text in SPECIALS:
        if text == "<unk>":
            continue
        try:
            ids.add(tokenizer.special_id(text))
        except MegalignError:
            pass
    return ids


def _check(tokenizer, ctx, length, depth):
    """Exact length, no special tokens, and the needle at the last sentence end at or before the requested depth."""
    ids = tokenizer.encode_batch([ctx.text])[0]
    assert len(ids) == length == ctx.length
    assert not set(ids) & _forbidden_ids(tokenizer)

    assert ctx.text[ctx.needle_char:].startswith(needle.NEEDLE)
    ends = sentence_ends(HAYSTACK)
    start = ctx.haystack_start  # 0, or a later sentence's start when merges forced it
    assert start == 0 or HAYSTACK[:start].rstrip() and len(HAYSTACK[:start].rstrip()) in ends
    window = HAYSTACK[start:]
    before = ctx.text[:ctx.needle_char].rstrip()
    after = ctx.text[ctx.needle_char + len(needle.NEEDLE):].strip()
    assert window.startswith(before)  # the haystack's own text, up to the needle ...
    assert window[len(before):].lstrip().startswith(after)  # ... and on from there
    if depth == 100:
        assert after == ""
        return
    assert before == "" or start + len(before) in ends
    # the requested point is depth % of the haystack tokens, and no sentence ends between the needle and it
    room = length - count_tokens(tokenizer, needle.NEEDLE)
    assert abs(ctx.requested_token - depth / 100 * room) <= 0.5
    # (byte-level tokens of one character share its span: up to 3 more than the prefix's own count)
    assert 0 <= ctx.requested_token - count_tokens(tokenizer, HAYSTACK[start:ctx.requested_char]) + 1 <= 4
    assert next(e for e in ends if e > start + len(before)) > ctx.requested_char
    assert ctx.depth <= depth + 100 / length


@pytest.mark.parametrize("length", [48, 100, 333, 1000, 2500])
@pytest.mark.parametrize("depth", [0, 10, 37, 50, 90])
def test_context_is_exact_and_needle_sits_at_the_sentence_end_before_the_depth(tokenizer, haystack, length, depth):
    _check(tokenizer, needle.build_context(tokenizer, haystack, length, depth, needle.NEEDLE), length, depth)


def test_every_length_is_exact_despite_merges_at_the_joins(tokenizer, haystack):
    """Some counts are skipped by cutting alone (a trailing space the needle absorbs; SentencePiece dropping a
    trailing space, then adding two tokens for the next word): the other join or a later start must hit them."""
    for length in range(40, 1200, 13):
        for depth in (10, 90, 100):
            _check(tokenizer, needle.build_context(tokenizer, haystack, length, depth, needle.NEEDLE), length, depth)


@pytest.mark.parametrize("length", [60, 500, 2000])
def test_depth_100_appends_the_needle(tokenizer, haystack, length):
    ctx = needle.build_context(tokenizer, haystack, length, 100, needle.NEEDLE)
    assert count_tokens(tokenizer, ctx.text) == length
    assert ctx.text.endswith(needle.NEEDLE)
    assert HAYSTACK.startswith(ctx.text[:ctx.needle_char].rstrip())
    assert abs(ctx.needle_token + count_tokens(tokenizer, needle.NEEDLE) - length) <= 1


def test_items_record_lengths_and_depths(tokenizer):
    lengths, depths = [80, 700, 1500], needle.default_depths()
    items = needle.needle_items(tokenizer, lengths, depths, HAYSTACK)
    assert len(items) == len(lengths) * len(depths) == len({i.id for i in items})
    for item in items:
        meta = item.meta
        context = item.prompt[:meta["context_chars"]]
        assert meta["actual_length"] == meta["requested_length"] == count_tokens(tokenizer, context)
        assert meta["actual_depth"] == round(100 * meta["needle_position"] / meta["actual_length"], 2)
        assert meta["actual_depth"] <= meta["requested_depth"] + 100 / meta["requested_length"]
        assert context[meta["needle_char"]:].startswith(needle.NEEDLE)
        assert item.prompt.endswith(needle.QUESTION) and item.references == [needle.ANSWER]
        assert meta["prompt_tokens"] > meta["actual_length"] and meta["haystack_repeats"] == 1
    deep = [i.meta for i in items if i.meta["requested_length"] == 1500]
    assert deep[0]["actual_depth"] < 12 and 80 < deep[-1]["actual_depth"] <= 90


def test_builtin_haystack_is_deterministic_from_the_seed(tokenizer):
    grid = dict(lengths=[120, 900], depths=[10, 90])
    first, again = needle.needle_items(tokenizer, **grid), needle.needle_items(tokenizer, **grid)
    assert first == again
    other = needle.needle_items(tokenizer, **grid, seed=1)
    assert [i.prompt for i in other] != [i.prompt for i in first]
    assert all(i.meta["actual_length"] == i.meta["requested_length"] for i in first + other)
    assert first[0].meta["haystack"] == "synthetic(seed=0)"


def test_short_haystack_file_is_repeated_or_a_one_line_error(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The first sentence is short. The second one is too!\n", encoding="utf-8")
    text = read_text_files([str(path)])
    with pytest.raises(MegalignError) as e:
        needle.needle_items(tokenizer, [400], [50], text, repeat_haystack=False)
    have = count_tokens(tokenizer, text)
    assert str(e.value) == f"the haystack text has {have} tokens; the 400-token context needs at least 400"
    [item] = needle.needle_items(tokenizer, [400], [50], text)
    assert item.meta["haystack_repeats"] > 1 and item.meta["actual_length"] == 400

    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(MegalignError, match=r"^haystack file .*empty\.txt is empty$"):
        read_text_files([str(tmp_path / "empty.txt")])


def test_bad_grids_and_leaked_special_tokens_are_one_line_errors(tokenizer, haystack):
    for kwargs, message in [
        (dict(lengths=[1000], depths=[120]), "depths are percents"),
        (dict(lengths=[0], depths=[50]), "positive whole token counts"),
        (dict(lengths=[], depths=[50]), "at least one length"),
    ]:
        with pytest.raises(MegalignError, match=message):
            needle.needle_items(tokenizer, haystack_text=HAYSTACK, **kwargs)
    with pytest.raises(MegalignError, match="no room for the needle"):
        needle.build_context(tokenizer, haystack, 5, 50, needle.NEEDLE)
    with pytest.raises(MegalignError, match=r"special token\(s\) '<\|im_start\|>'"):
        needle.needle_items(tokenizer, [300], [50], "<|im_start|> " + HAYSTACK)


def test_default_grid_follows_longalign():
    assert needle.default_depths() == [10, 19, 28, 37, 46, 54, 63, 72, 81, 90]
    lengths = needle.default_lengths(64000)
    assert len(lengths) == 10 and lengths[0] == 1000 and lengths[-1] == 64000 - 200
    with pytest.raises(MegalignError, match="below the shortest context"):
        needle.default_lengths(1100)


def test_string_match_and_heatmap(tmp_path):
    assert needle.score_string_match("The number is 4827391.", ["4827391"]) == 1.0
    assert needle.score_string_match("DOLORES park, I think", ["dolores Park", "sandwich"]) == 0.5
    assert needle.score_string_match("no idea", ["4827391"]) == 0.0

    results = [{"meta": {"requested_length": L, "requested_depth": d}, "score": float(L > 1000 or d < 50)}
               for L in (1000, 4000) for d in (10, 50, 90)]
    results += [{"meta": {"requested_length": 8000, "requested_depth": 10}, "score": s} for s in (0.0, 1.0)]
    path = tmp_path / "needle.png"
    grid = needle.heatmap(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grid["lengths"] == [1000, 4000, 8000] and grid["depths"] == [10, 50, 90]
    assert grid["scores"] == [[1.0, 1.0, 0.5], [0.0, 1.0, None], [0.0, 1.0, None]]
    json.dumps(grid)
