"""The preprocessing pipeline end to end: round trip, megatron compatibility, bad input, determinism."""

import gzip
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from megalign.data import format as fmt
from megalign.data import synthetic, writer
from megalign.data.packed_dataset import PackedDataset
from megalign.data.preprocess import PreprocessOptions, available_cpus, preprocess
from megalign.data.records import parse_record
from megalign.data.templates import make_encoder
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError

SEQ = 1024


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    return synthetic.make_example(out, n_long=12, n_short=60, min_words=80, max_words=400, seed=3)


def options(tmp_path, tokenizer, inputs, **kw):
    kw.setdefault("chat_template", "chatml")
    kw.setdefault("seq_length", SEQ)
    kw.setdefault("output_prefix", str(tmp_path / "ds"))
    kw.setdefault("progress", False)
    return PreprocessOptions(inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), **kw)


def encode_file(tokenizer_dir, template, path):
    encoder = make_encoder(template, load_tokenizer(tokenizer_dir))
    with open(path, "rb") as f:
        convs = [parse_record(line.rstrip(b"\n")) for line in f if line.strip()]
    return encoder.encode_many(convs)


def as_key(tokens, mask):
    return (tuple(np.asarray(tokens).tolist()), tuple(np.asarray(mask).tolist()))


@pytest.mark.parametrize("strategy", ["bfd", "ffs", "next-fit", "sorted", "none"])
def test_round_trip_every_sample_once_in_capacity(tmp_path, bpe_tokenizer_dir, example, strategy):
    result = preprocess(options(tmp_path, bpe_tokenizer_dir, [example["long"], example["short"]], packing=strategy))
    ds = PackedDataset(result.prefix)
    expected = Counter(as_key(s.tokens, s.loss_mask)
                       for p in (example["long"], example["short"])
                       for s in encode_file(bpe_tokenizer_dir, "chatml", p))
    found = Counter()
    for k in range(len(ds)):
        pack = ds[k]
        assert len(pack.tokens) == len(pack.loss_mask) == pack.lengths.sum() <= SEQ
        bounds = np.concatenate([[0], np.cumsum(pack.lengths)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            found[as_key(pack.tokens[a:b], pack.loss_mask[a:b])] += 1
    assert found == expected
    m = ds.meta
    assert m["counts"]["read"] == m["counts"]["kept"] == m["num_samples"] == 72
    assert m["counts"]["rejected"] == {}
    assert m["num_tokens"] == sum(len(k[0]) for k in expected.elements())
    assert m["num_loss_tokens"] == sum(sum(k[1][1:]) for k in expected.elements())
    assert m["packing_efficiency"] == pytest.approx(m["num_tokens"] / (len(ds) * SEQ), abs=1e-6)
    assert sum(m["length_histogram"]["counts"]) == 72 and sum(m["pack_fill_histogram"]["counts"]) == len(ds)
    assert m["tokenizer"]["sha256"] == load_tokenizer(bpe_tokenizer_dir).fingerprint
    assert os.path.getsize(fmt.rejects_file(result.prefix)) == 0
    assert not private_leftovers(result.prefix)  # no scratch left behind


def test_megatron_indexed_dataset_reads_the_output(tmp_path, bpe_tokenizer_dir, example):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    result = preprocess(options(tmp_path, bpe_tokenizer_dir, [example["long"], example["short"]]))
    ours = PackedDataset(result.prefix)
    tokens, mask = IndexedDataset(result.prefix), IndexedDataset(result.prefix + "_loss_mask")
    assert len(tokens) == len(mask) == ours.meta["num_samples"]
    assert len(tokens.document_indices) == ours.meta["num_packs"] + 1  # one document per pack
    assert tokens.index.dtype == np.uint16 and mask.index.dtype == np.uint8  # vocab 600 fits uint16
    first, last = tokens.document_indices[0], tokens.document_indices[1]
    assert np.array_equal(np.concatenate(tokens[first:last]), ours[0].tokens)
    assert np.array_equal(np.concatenate(mask[first:last]), ours[0].loss_mask)


def private_leftovers(prefix):
    """Hidden entries at a prefix other than the published version and the link to it."""
    current = writer.current_link(prefix)
    keep = {current.name, os.readlink(current)} if current.is_symlink() else set()
    return sorted(p.name for p in current.parent.iterdir() if p.name.startswith(".") and p.name not in keep)


def output_bytes(prefix):
    return {p.name: p.read_bytes() for p in fmt.all_files(prefix)}


@pytest.mark.skipif(available_cpus() < 2, reason="workers are at most the CPUs available")
def test_same_output_whatever_the_worker_count(tmp_path, bpe_tokenizer_dir, example):
    inputs = [example["long"], example["short"]]
    one = preprocess(options(tmp_path, bpe_tokenizer_dir, inputs, output_prefix=str(tmp_path / "w1"), workers=1,
                             ratios=[1.5, 0.7]))
    two = preprocess(options(tmp_path, bpe_tokenizer_dir, inputs, output_prefix=str(tmp_path / "w2"), workers=2,
                             ratios=[1.5, 0.7]))
    a, b = output_bytes(one.prefix), output_bytes(two.prefix)
    assert [v for _, v in sorted(a.items())] == [v for _, v in sorted(b.items())]


def test_gzip_input_gives_the_same_dataset(tmp_path, bpe_tokenizer_dir, example):
    gz = tmp_path / "short.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(example["short"].read_bytes())
    plain = preprocess(options(tmp_path, bpe_tokenizer_dir, [example["short"]], output_prefix=str(tmp_path / "p")))
    zipped = preprocess(options(tmp_path, bpe_tokenizer_dir, [gz], output_prefix=str(tmp_path / "z")))
    assert (tmp_path / "p.bin").read_bytes() == (tmp_path / "z.bin").read_bytes()
    assert plain.metadata["num_packs"] == zipped.metadata["num_packs"]


def test_mixing_ratios_are_seeded_and_reconcile(tmp_path, bpe_tokenizer_dir, example):
    def run(name, ratios, seed=1234):
        return preprocess(options(tmp_path, bpe_tokenizer_dir, [example["long"], example["short"]],
                                  output_prefix=str(tmp_path / name), ratios=ratios, seed=seed)).metadata

    m = run("a", [2, 0.5])
    long, short = m["inputs"]
    assert long["kept"] == 24 and long["duplicated"] == 12 and long["sampled_out"] == 0
    assert short["kept"] + short["sampled_out"] == 60 and 15 <= short["kept"] <= 45
    assert m["counts"]["read"] == 72 == m["counts"]["kept"] - m["counts"]["duplicated"] + m["counts"]["sampled_out"]
    assert run("b", [2, 0.5])["inputs"][1]["kept"] == short["kept"]  # same seed, same draw
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    other = [run(f"s{s}", [2, 0.5], seed=s)["inputs"][1]["kept"] for s in range(4)]
    assert len(set(other + [short["kept"]])) > 1  # another seed draws another subset
    assert run("zero", [1, 0])["inputs"][1] | {"rejected": {}} == {
        "path": str(example["short"]), "ratio": 0.0, "read": 60, "kept": 0, "duplicated": 0, "sampled_out": 60,
        "truncated": 0, "blank_lines": 0, "rejected": {}}


BAD_LINES = [
    (b'{"messages": [{"role": "user", "content": "q"', "malformed_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "a"}]}', "invalid_utf8"),
    (b'{"prompt": "no messages"}', "wrong_shape"),
    (b'{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "unknown_role"),
    (b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}', "empty_content"),
    (b'{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}', "non_string_content"),
    (b'{"messages": [{"role": "user", "content": "only a question"}]}', "no_assistant_turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     b'{"role": "user", "content": "q"}]}', "bad_turn_order"),
]


def long_line(words: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "word " * words},
                                    {"role": "assistant", "content": "short answer"}]}).encode()


def write_mixed(path, good_path, too_long_words=3000):
    good = [l for l in good_path.read_bytes().splitlines() if l.strip()][:20]
    lines = good[:10] + [b for b, _ in BAD_LINES] + [long_line(too_long_words), b""] + good[10:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_record_is_rejected_with_reason_and_line(tmp_path, bpe_tokenizer_dir, example):
    mixed = write_mixed(tmp_path / "mixed.jsonl", example["short"])
    result = preprocess(options(tmp_path, bpe_tokenizer_dir, [mixed], max_reject_fraction=0.5))
    c = result.metadata["counts"]
    expected = Counter(reason for _, reason in BAD_LINES) + Counter({"too_long": 1})
    assert c["rejected"] == dict(expected)
    assert c["read"] == 29 and c["kept"] == 20 and c["blank_lines"] == 1
    assert c["read"] == c["kept"] + sum(c["rejected"].values())
    rejects = [json.loads(l) for l in fmt.rejects_file(result.prefix).read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == (
        [(11 + i, reason) for i, (_, reason) in enumerate(BAD_LINES)] + [(19, "too_long")])
    assert all(r["input"] == str(mixed) and r["detail"] for r in rejects)


def test_truncate_policy_keeps_a_prefix(tmp_path, bpe_tokenizer_dir, example):
    path = tmp_path / "long.jsonl"
    answer_last = json.dumps({"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "word " * 3000}]}).encode()
    path.write_bytes(long_line(3000) + b"\n" + answer_last + b"\n")
    m = preprocess(options(tmp_path, bpe_tokenizer_dir, [path], overlength="truncate",
                           max_reject_fraction=1.0)).metadata
    # the first keeps only user tokens after truncation: nothing to learn, rejected; the second is cut to SEQ
    assert m["counts"]["rejected"] == {"no_loss_tokens": 1}
    assert m["counts"]["truncated"] == 1 and m["num_tokens"] == SEQ


def test_too_many_rejects_fail_with_the_reasons_and_no_dataset(tmp_path, bpe_tokenizer_dir, example):
    mixed = write_mixed(tmp_path / "mixed.jsonl", example["short"])
    with pytest.raises(MegalignError, match=r"max_reject_fraction 0\.01 is exceeded: 9 of 29 records rejected \(31\.03%;.*"
                                            r"too_long: 1.*see .*ds\.rejects\.jsonl"):
        preprocess(options(tmp_path, bpe_tokenizer_dir, [mixed]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ds")] == ["ds.rejects.jsonl"]


def test_existing_prefix_is_refused_without_overwrite(tmp_path, bpe_tokenizer_dir, example):
    opts = options(tmp_path, bpe_tokenizer_dir, [example["short"]])
    preprocess(opts)
    before = output_bytes(opts.output_prefix)
    with pytest.raises(MegalignError, match="exists .*set overwrite to replace it"):
        preprocess(opts)
    opts.overwrite, opts.seq_length = True, 512
    preprocess(opts)
    assert PackedDataset(opts.output_prefix).seq_length == 512 and output_bytes(opts.output_prefix) != before


def test_a_failure_while_writing_leaves_no_files(tmp_path, bpe_tokenizer_dir, example, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_packs", broken)
    with pytest.raises(OSError, match="disk full"):
        preprocess(options(tmp_path, bpe_tokenizer_dir, [example["short"]]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,message", [
    ({"inputs": ["/nonexistent.jsonl"]}, "inputs /nonexistent.jsonl: no such file"),
    ({"tokenizer": "/nonexistent/tok"}, "tokenizer /nonexistent/tok does not exist"),
    ({"chat_template": "alpaca"}, "chat_template 'alpaca' is unknown; valid: llama2, llama3, chatml, chatglm3, hf"),
    ({"packing": "greedy"}, "packing 'greedy' is unknown; valid: bfd, ffs, next-fit, sorted, none"),
    ({"seq_length": 0}, "seq_length must be at least 2"),
    ({"workers": 0}, "workers must be at least 1"),
    ({"ratios": [1, 2]}, "ratios has 2 values for 1 inputs"),
    ({"ratios": [-1]}, "each must be a finite number >= 0"),
    ({"overlength": "wrap"}, "overlength 'wrap' is unknown"),
    ({"max_reject_fraction": 2}, "max_reject_fraction must be in"),
    ({"output_prefix": "/nonexistent/dir/ds"}, "directory /nonexistent/dir does not exist"),
])
def test_bad_options_fail_before_any_work(tmp_path, bpe_tokenizer_dir, example, change, message):
    opts = options(tmp_path, bpe_tokenizer_dir, [example["short"]])
    for k, v in change.items():
        setattr(opts, k, v)
    with pytest.raises(MegalignError, match=re_escape(message)):
        preprocess(opts)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_tokenizer_is_a_clear_error(tmp_path, example):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(MegalignError, match="cannot read tokenizer .*tokenizer.json"):
        preprocess(options(tmp_path, bad, [example["short"]], output_prefix=str(tmp_path / "ds")))


def re_escape(s):
    import re

    return re.escape(s)


# ------------------------------------------------------------------------------------------------ the reader

@pytest.fixture()
def dataset_copy(tmp_path, bpe_tokenizer_dir, example):
    return preprocess(options(tmp_path, bpe_tokenizer_dir, [example["short"]])).prefix


def test_reader_refuses_a_truncated_file(dataset_copy):
    path = dataset_copy + ".bin"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-2])
    with pytest.raises(MegalignError, match=r"ds\.bin has \d+ bytes, metadata says \d+: truncated"):
        PackedDataset(dataset_copy)


def test_reader_refuses_a_corrupted_file(dataset_copy):
    path = dataset_copy + "_loss_mask.bin"
    data = bytearray(open(path, "rb").read())
    data[5] ^= 1
    open(path, "wb").write(bytes(data))
    PackedDataset(dataset_copy, verify="sizes")  # sizes alone cannot see it
    with pytest.raises(MegalignError, match="ds_loss_mask.bin fails its sha256 check"):
        PackedDataset(dataset_copy)


def test_reader_refuses_files_from_another_dataset(dataset_copy, tmp_path, bpe_tokenizer_dir, example):
    other = preprocess(options(tmp_path, bpe_tokenizer_dir, [example["long"]], output_prefix=str(tmp_path / "o"))).prefix
    shutil.copy(other + ".idx", dataset_copy + ".idx")
    with pytest.raises(MegalignError, match="ds.idx has .* bytes|ds.idx fails its sha256"):
        PackedDataset(dataset_copy)


def test_reader_refuses_other_versions_and_missing_metadata(dataset_copy):
    meta = fmt.meta_file(dataset_copy)
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps(m | {"format_version": 3}))
    with pytest.raises(MegalignError, match="format_version 3; this megalign reads version 1"):
        PackedDataset(dataset_copy)
    meta.unlink()
    with pytest.raises(MegalignError, match="ds.json not found: .* not a megalign packed dataset"):
        PackedDataset(dataset_copy)
