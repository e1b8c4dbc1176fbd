"""`--shard I/N` runs and their merge: the dataset, byte for byte, that one run makes with the same options and seed
(every file: tokens, loss mask, position offsets, metadata, rejects); and the merge's refusals."""

import json
import shutil

import pytest

from megalign.data import format as fmt
from megalign.data import shards, synthetic
from megalign.data.cli import merge_main, preprocess_main
from megalign.data.packed_dataset import PackedDataset
from megalign.data.preprocess import MergeOptions, merge, preprocess
from megalign.data.shards import parse_shard
from megalign.errors import MegalignError
from tests.data.test_preprocess import options, private_leftovers, re_escape
from tests.data.test_text_records import BAD_TEXT, text_options


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text documents (long and short, a few bad lines, a blank one) and chats (a few bad lines)."""
    out = tmp_path_factory.mktemp("shards")
    text = synthetic.make_text_example(out, n_long=6, n_short=50, min_words=200, max_words=600, seed=2)
    short = text["short"].read_bytes().splitlines()
    text["short"].write_bytes(b"\n".join(short[:20] + [raw for raw, _ in BAD_TEXT[:4]] + [b""] + short[20:]) + b"\n")
    chats = synthetic.make_example(out / "chat", n_long=4, n_short=40, min_words=50, max_words=300, seed=2)
    lines = chats["short"].read_bytes().splitlines()
    chats["short"].write_bytes(b"\n".join(lines[:7] + [b"{broken", b'{"messages": []}'] + lines[7:]) + b"\n")
    return {"text": [text["long"], text["short"]], "chat": [chats["long"], chats["short"]]}


def every_file(prefix):
    """The bytes of each file of the dataset at prefix, by name (the position offsets when there are any)."""
    paths = fmt.all_files(prefix) + [p for p in fmt.optional_files(prefix) if p.exists()]
    return {p.name: p.read_bytes() for p in paths}


def run_options(kind, tmp_path, tokenizer, inputs, prefix, **kw):
    kw.setdefault("ratios", [1.5, 0.7])
    kw.setdefault("max_reject_fraction", 0.5)
    if kind == "text":
        return text_options(tmp_path, tokenizer, inputs, output_prefix=str(prefix), seq_length=512,
                            positions="continue", **kw)
    return options(tmp_path, tokenizer, inputs, output_prefix=str(prefix), **kw)


@pytest.mark.parametrize("kind,count,block_lines", [("text", 3, 4), ("text", 2, 64), ("chat", 3, 5), ("text", 1, 4)])
def test_shards_merged_equal_one_run_byte_for_byte(tmp_path, bpe_tokenizer_dir, corpus, kind, count, block_lines):
    inputs = corpus[kind]
    (tmp_path / "one").mkdir()
    single = preprocess(run_options(kind, tmp_path, bpe_tokenizer_dir, inputs, tmp_path / "one" / "single"))
    for i in reversed(range(count)):  # any order: each shard is its own job
        result = preprocess(run_options(kind, tmp_path, bpe_tokenizer_dir, inputs, tmp_path / "sharded",
                                        shard=(i, count), shard_block_lines=block_lines))
        assert result.prefix == str(tmp_path / f"sharded.shard-{i}-of-{count}") and result.shard == (i, count)
        assert not (tmp_path / "sharded.json").exists()  # a shard makes no dataset
    merged = merge(MergeOptions(str(tmp_path / "sharded")))
    a, b = every_file(single.prefix), every_file(merged.prefix)
    assert sorted(a) == [n.replace("sharded", "single") for n in sorted(b)]
    assert [a[n] for n in sorted(a)] == [b[n] for n in sorted(b)]  # tokens, mask, offsets, metadata, rejects
    m = merged.metadata
    assert m["counts"]["rejected"] and m["counts"]["duplicated"] and m["counts"]["sampled_out"]  # all paths taken
    assert (kind == "text") == (fmt.POSITION_OFFSETS_SUFFIX in m["files"])
    assert not list(tmp_path.glob("sharded.shard-*")) and not private_leftovers(merged.prefix)  # parts removed
    PackedDataset(merged.prefix)  # sizes and checksums


def test_every_record_is_in_exactly_one_shard(tmp_path, bpe_tokenizer_dir, corpus):
    inputs, reads = corpus["text"], []
    for i in range(3):
        m = preprocess(run_options("text", tmp_path, bpe_tokenizer_dir, inputs, tmp_path / "ds", shard=(i, 3),
                                   shard_block_lines=4)).metadata
        reads.append([c["read"] + c["blank_lines"] for c in m["inputs"]])
        assert sum(reads[-1]) > 0
    lines = [len(p.read_bytes().splitlines()) for p in inputs]
    assert [sum(r[k] for r in reads) for k in range(2)] == lines
    part = shards.load_part(tmp_path / "ds.shard-1-of-3")
    keys = part.samples[:, 1:]
    assert ((keys[:, 1] - 1 + keys[:, 0] * lines[0]) // 4 % 3 == 1).all()  # its own blocks only
    part.close()


def test_the_command_lines_shard_and_merge(tmp_path, bpe_tokenizer_dir, corpus, capsys):
    common = ["--input", *map(str, corpus["text"]), "--tokenizer", str(bpe_tokenizer_dir), "--seq-length", "512",
              "--output-prefix", str(tmp_path / "ds"), "--max-reject-fraction", "0.5", "--no-progress"]
    for i in range(2):
        preprocess_main(common + ["--shard", f"{i}/2"])
        assert f"wrote shard {i}/2 to {tmp_path / f'ds.shard-{i}-of-2'}" in capsys.readouterr().out
    merge_main(["--output-prefix", str(tmp_path / "ds"), "--keep-shards", "--no-progress"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'ds'}.{{bin,idx,json}}" in out and "documents cut into pieces" in out
    assert len(list(tmp_path.glob("ds.shard-*-of-2"))) == 2  # kept
    preprocess_main(common + ["--output-prefix", str(tmp_path / "one")])
    a, b = every_file(str(tmp_path / "one")), every_file(str(tmp_path / "ds"))
    assert [a[n] for n in sorted(a)] == [b[n] for n in sorted(b)]
    with pytest.raises(SystemExit) as exit_:
        merge_main(["--output-prefix", str(tmp_path / "ds")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output-prefix ") and "set --overwrite to replace it" in err
    with pytest.raises(SystemExit):
        preprocess_main(common + ["--shard", "2/2"])
    assert "argument --shard: 2/2: I must be in [0, N)" in capsys.readouterr().err


def make_shards(tmp_path, tokenizer, corpus, count, prefix="ds", **kw):
    for i in range(count):
        preprocess(run_options("text", tmp_path, tokenizer, corpus["text"], tmp_path / prefix, shard=(i, count),
                               shard_block_lines=4, **kw))


def test_a_merge_refuses_missing_or_mismatched_shards(tmp_path, bpe_tokenizer_dir, corpus):
    prefix = str(tmp_path / "ds")
    with pytest.raises(MegalignError, match="no shards to merge"):
        merge(MergeOptions(prefix))
    make_shards(tmp_path, bpe_tokenizer_dir, corpus, 3)
    shutil.rmtree(tmp_path / "ds.shard-1-of-3")
    with pytest.raises(MegalignError, match=re_escape("shards 1/3 of 3 are missing or incomplete; run them")):
        merge(MergeOptions(prefix))
    preprocess(run_options("text", tmp_path, bpe_tokenizer_dir, corpus["text"], tmp_path / "ds", shard=(1, 3),
                           shard_block_lines=4, seed=7))
    with pytest.raises(MegalignError, match=r"ds\.shard-1-of-3 was made with seed=7, but .*ds\.shard-0-of-3 with 1234"):
        merge(MergeOptions(prefix))
    make_shards(tmp_path, bpe_tokenizer_dir, corpus, 2)
    with pytest.raises(MegalignError, match=re_escape("shards of different counts N (2, 3) lie here")):
        merge(MergeOptions(prefix))
    assert not fmt.meta_file(prefix).exists()


def test_a_finished_shard_is_kept_unless_overwrite(tmp_path, bpe_tokenizer_dir, corpus):
    make_shards(tmp_path, bpe_tokenizer_dir, corpus, 2)
    with pytest.raises(MegalignError, match=re_escape("shard 0/2 of ") + ".*exists.*set overwrite to replace it"):
        make_shards(tmp_path, bpe_tokenizer_dir, corpus, 1 + 1)
    make_shards(tmp_path, bpe_tokenizer_dir, corpus, 2, overwrite=True)
    meta = json.loads((tmp_path / "ds.shard-0-of-2" / "part.json").read_text())
    assert meta["shard"] == [0, 2] and meta["num_samples"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.shard-0-of-2", "ds.shard-1-of-2"]  # no scratch left


def test_slurm_array_shards():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
           "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("slurm", env) == (2, 4) and parse_shard("3/8") == (3, 8)
    with pytest.raises(MegalignError, match="slurm needs a Slurm job array"):
        parse_shard("slurm", {})
    with pytest.raises(MegalignError, match="'3-8' is not I/N"):
        parse_shard("3-8")
