"""Text records ({"text": ...}) through the preprocessing pipeline: documents round trip (the tokenizer's ids,
BOS/EOS, loss on every token), long documents cut into pieces with no token lost or duplicated, positions that
restart or continue across pieces, bad records rejected with reasons, one kind of record per input and per run."""

import json
import os
from collections import Counter

import numpy as np
import pytest

from megalign.data import format as fmt
from megalign.data import synthetic
from megalign.data.inspect import describe
from megalign.data.packed_dataset import PackedDataset
from megalign.data.preprocess import PreprocessOptions, preprocess
from megalign.errors import MegalignError
from tests.data.test_preprocess import private_leftovers, re_escape

SEQ = 512


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    return synthetic.make_text_example(out, n_long=8, n_short=40, min_words=250, max_words=600, seed=1)


def text_options(tmp_path, tokenizer, inputs, **kw):
    kw.setdefault("seq_length", SEQ)
    kw.setdefault("output_prefix", str(tmp_path / "ds"))
    kw.setdefault("progress", False)
    return PreprocessOptions(inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), **kw)


def reference_documents(tokenizer_dir, path):
    """[BOS] + the raw HF tokenizer's ids + [EOS] of every record of `path`, straight from `tokenizers`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    with open(path, encoding="utf-8") as f:
        return [[bos] + tok.encode(json.loads(line)["text"], add_special_tokens=False).ids + [eos] for line in f]


def samples_of(ds):
    """(tokens, loss mask, position offset) of every sample of every pack."""
    found = []
    for k in range(len(ds)):
        pack = ds[k]
        bounds = np.concatenate([[0], np.cumsum(pack.lengths)])
        offsets = pack.position_offsets if pack.position_offsets is not None else np.zeros(len(pack.lengths), int)
        for a, b, offset in zip(bounds[:-1], bounds[1:], offsets):
            found.append((tuple(pack.tokens[a:b].tolist()), tuple(pack.loss_mask[a:b].tolist()), int(offset)))
    return found


def test_short_documents_round_trip_as_the_tokenizer_encodes_them(tmp_path, bpe_tokenizer_dir, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    result = preprocess(text_options(tmp_path, bpe_tokenizer_dir, [docs["short"]], packing="none"))
    ds = PackedDataset(result.prefix)
    expected = reference_documents(bpe_tokenizer_dir, docs["short"])
    assert all(len(d) <= SEQ for d in expected)
    # packing none keeps input order: sample k is document k, the tokenizer's ids between BOS and EOS
    assert [list(t) for t, _, _ in samples_of(ds)] == expected
    assert all(set(mask) == {1} for _, mask, _ in samples_of(ds))  # loss on every token
    m = ds.meta
    assert m["record_kind"] == "text" and m["chat_template"] is None and m["overlength"] == "split"
    assert m["documents"] == {"bos_id": expected[0][0], "eos_id": expected[0][-1], "min_piece_length": 2,
                              "positions": "restart", "max_position": max(map(len, expected))}
    assert m["counts"] | {"rejected": {}} == {"read": 40, "kept": 40, "duplicated": 0, "sampled_out": 0, "truncated": 0,
                                              "blank_lines": 0, "split": 0, "samples": 40,
                                              "tokens": sum(map(len, expected)), "tails_dropped": 0,
                                              "tail_tokens_dropped": 0, "rejected": {}}
    assert m["num_tokens"] == sum(map(len, expected)) and m["num_loss_tokens"] == m["num_tokens"] - 40
    assert not fmt.position_offsets_file(result.prefix).exists() and ds[0].position_offsets is None
    assert len(IndexedDataset(result.prefix)) == 40  # megatron's own reader
    assert "text documents (BOS" in describe(ds) and not private_leftovers(result.prefix)


@pytest.mark.parametrize("positions,min_piece", [("restart", None), ("continue", None), ("continue", 100)])
def test_long_documents_become_pieces_with_no_token_lost_or_duplicated(tmp_path, bpe_tokenizer_dir, docs, positions,
                                                                       min_piece):
    inputs = [docs["long"], docs["short"]]
    result = preprocess(text_options(tmp_path, bpe_tokenizer_dir, inputs, positions=positions,
                                     min_piece_length=min_piece))
    ds = PackedDataset(result.prefix)
    documents = [d for path in inputs for d in reference_documents(bpe_tokenizer_dir, path)]
    assert sum(len(d) > SEQ for d in documents) >= 6  # most long documents need pieces
    expected, dropped = Counter(), []
    for d in documents:
        for start in range(0, len(d), SEQ):
            piece = tuple(d[start:start + SEQ])
            if start and len(piece) < (min_piece or 2):
                dropped.append(len(piece))
                continue
            expected[piece, (1,) * len(piece), start if positions == "continue" else 0] += 1
    found = Counter(samples_of(ds))
    assert found == expected  # each piece once, at its document's position offset (or 0), all targets
    c = ds.meta["counts"]
    assert c["samples"] == ds.meta["num_samples"] == sum(expected.values())
    assert c["split"] == sum(len(d) > SEQ for d in documents) and c["kept"] == len(documents)
    assert c["tails_dropped"] == len(dropped) and c["tail_tokens_dropped"] == sum(dropped)
    assert ds.meta["num_tokens"] + sum(dropped) == sum(map(len, documents))  # what is not in the dataset was dropped
    assert [i["tokens"] for i in ds.meta["inputs"]] == [sum(map(len, reference_documents(bpe_tokenizer_dir, path)))
                                                        - (sum(dropped) if path == docs["long"] else 0)
                                                        for path in inputs]
    if min_piece == 100:
        assert dropped and min(dropped) >= 1 and max(dropped) < 100
    assert ds.meta["documents"]["max_position"] == max(offset + len(t) for t, _, offset in expected)
    assert fmt.position_offsets_file(result.prefix).exists() == (positions == "continue")


def test_replacing_a_dataset_with_continued_positions_by_one_without(tmp_path, bpe_tokenizer_dir, docs):
    prefix = str(tmp_path / "ds")
    for positions in ("continue", "restart", "continue"):
        preprocess(text_options(tmp_path, bpe_tokenizer_dir, [docs["long"]], positions=positions, overwrite=True))
        ds = PackedDataset(prefix)
        assert ds.meta["documents"]["positions"] == positions
        assert fmt.position_offsets_file(prefix).exists() == (positions == "continue")
        assert os.path.lexists(fmt.position_offsets_file(prefix)) == (positions == "continue")  # no dangling link
        assert (ds[0].position_offsets is not None) == (positions == "continue")
        assert not private_leftovers(prefix)


def test_overlength_drop_and_truncate_for_documents(tmp_path, bpe_tokenizer_dir, docs):
    documents = reference_documents(bpe_tokenizer_dir, docs["long"])
    long = sum(len(d) > SEQ for d in documents)
    dropped = preprocess(text_options(tmp_path, bpe_tokenizer_dir, [docs["long"], docs["short"]], overlength="drop",
                                      output_prefix=str(tmp_path / "drop"), max_reject_fraction=1.0)).metadata
    assert dropped["counts"]["rejected"] == {"too_long": long} and dropped["num_samples"] == len(documents) - long + 40
    truncated = preprocess(text_options(tmp_path, bpe_tokenizer_dir, [docs["long"]], overlength="truncate",
                                        output_prefix=str(tmp_path / "cut")))
    ds = PackedDataset(truncated.prefix)
    assert Counter(t for t, _, _ in samples_of(ds)) == Counter(tuple(d[:SEQ]) for d in documents)
    assert ds.meta["counts"]["truncated"] == long and ds.meta["counts"]["split"] == 0


BAD_TEXT = [
    (b'{"text": "unterminated', "malformed_json"),
    (b'{"text": "caf\xe9"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b'{"text": 42}', "non_string_content"),
    (b'{"text": null}', "non_string_content"),
    (b'{"text": "  \\n "}', "empty_content"),
    (b'{"title": "no text key"}', "wrong_shape"),
    (b'["a", "list"]', "wrong_shape"),
    (b'{"text": "' + b"word " * 400 + b'"}', "too_large"),
]


def test_bad_text_records_are_rejected_with_reason_and_line_and_counts_reconcile(tmp_path, bpe_tokenizer_dir, docs):
    good = docs["short"].read_bytes().splitlines()[:10]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(good[:5] + [raw for raw, _ in BAD_TEXT] + [b""] + good[5:]) + b"\n")
    m = preprocess(text_options(tmp_path, bpe_tokenizer_dir, [path], max_record_bytes=1000,
                                max_reject_fraction=0.5)).metadata
    c = m["counts"]
    assert c["rejected"] == dict(Counter(reason for _, reason in BAD_TEXT))
    assert c["read"] == 19 and c["kept"] == 10 and c["blank_lines"] == 1
    assert c["read"] == c["kept"] - c["duplicated"] + c["sampled_out"] + sum(c["rejected"].values())
    rejects = [json.loads(line) for line in fmt.rejects_file(str(tmp_path / "ds")).read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(6 + i, reason) for i, (_, reason) in enumerate(BAD_TEXT)]
    assert all(r["input"] == str(path) and r["detail"] for r in rejects)


def test_a_one_token_document_has_nothing_to_train_on(tmp_path, word_tokenizer_dir):
    # the word tokenizer has BOS and EOS, so every document has at least two tokens: a tokenizer without them
    # (its config names none) leaves a one-word document a single token
    bare = tmp_path / "tok"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((word_tokenizer_dir / "tokenizer.json").read_bytes())
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "hello"}\n{"text": "hello bye"}\n')
    m = preprocess(text_options(tmp_path, bare, [path], max_reject_fraction=0.5)).metadata
    assert m["counts"]["rejected"] == {"no_loss_tokens": 1} and m["documents"]["bos_id"] is None
    with_bos = preprocess(text_options(tmp_path, word_tokenizer_dir, [path], output_prefix=str(tmp_path / "b"),
                                       packing="none"))
    assert [t for t, _, _ in samples_of(PackedDataset(with_bos.prefix))] == [(1, 27, 2), (1, 27, 19, 28, 2)]


# ------------------------------------------------------------------------------------------ one kind per input

def test_an_input_mixing_kinds_is_an_error_naming_file_and_line(tmp_path, bpe_tokenizer_dir, docs):
    lines = docs["short"].read_bytes().splitlines()[:6]
    chat = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([b"{not json"] + lines[:3] + [chat] + lines[3:]) + b"\n")
    with pytest.raises(MegalignError, match=re_escape(f"{path} line 5: a chat record (\"messages\"/\"conversations\") "
                                                      "in an input of text records (line 2 is one): one input holds "
                                                      "one kind of record")):
        preprocess(text_options(tmp_path, bpe_tokenizer_dir, [path], max_reject_fraction=1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["mixed.jsonl"]  # no dataset, no scratch, no lock


@pytest.mark.parametrize("change,message", [
    ({"chat_template": "chatml"}, "chat_template is for chat records; {short} holds text records"),
    ({"overlength": "wrap"}, "overlength 'wrap' is unknown; valid: drop, truncate, split"),
    ({"positions": "absolute"}, "positions 'absolute' is unknown; valid: restart, continue"),
    ({"positions": "continue", "overlength": "truncate"}, "positions continue needs overlength split"),
    ({"min_piece_length": 1}, "min_piece_length must be in [2, 512]"),
    ({"min_piece_length": 600}, "min_piece_length must be in [2, 512]"),
])
def test_document_options_are_checked_before_any_work(tmp_path, bpe_tokenizer_dir, docs, change, message):
    opts = text_options(tmp_path, bpe_tokenizer_dir, [docs["short"]], **change)
    with pytest.raises(MegalignError, match=re_escape(message.replace("{short}", str(docs["short"])))):
        preprocess(opts)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,message", [
    ({"chat_template": None}, "chat_template is needed for chat records ({chats}); valid: llama2"),
    ({"positions": "continue"}, "positions is for text records (documents cut into pieces); {chats} holds chats"),
    ({"min_piece_length": 8}, "min_piece_length is for text records"),
    ({"overlength": "split"}, "overlength 'split' is unknown; valid: drop, truncate (split is for text records)"),
])
def test_chat_inputs_refuse_the_document_options(tmp_path, bpe_tokenizer_dir, change, message):
    chats = synthetic.make_example(tmp_path / "in", 0, 5, 10, 20)["short"]
    opts = text_options(tmp_path, bpe_tokenizer_dir, [chats], chat_template="chatml",
                        output_prefix=str(tmp_path / "ds"))
    for k, v in change.items():
        setattr(opts, k, v)
    with pytest.raises(MegalignError, match=re_escape(message.replace("{chats}", str(chats)))):
        preprocess(opts)
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_inputs_of_different_kinds_in_one_run_are_refused(tmp_path, bpe_tokenizer_dir, docs):
    chats = synthetic.make_example(tmp_path / "in", 0, 5, 10, 20)["short"]
    for template in ("chatml", None):
        with pytest.raises(MegalignError, match=re_escape(
                f"inputs mix chat records ({chats}, line 1) and text records ({docs['short']}, line 1): one run "
                "makes one kind of dataset; preprocess each kind into its own prefix")):
            preprocess(text_options(tmp_path, bpe_tokenizer_dir, [chats, docs["short"]], chat_template=template))
    assert [p.name for p in tmp_path.iterdir()] == ["in"]
