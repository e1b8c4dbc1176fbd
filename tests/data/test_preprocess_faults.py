"""Nothing lost under bad input and faults: atomic publishing, one run per prefix, inputs never overwritten,
stale scratch cleared, bad records rejected (never fatal), option bounds."""

import gzip
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from megalign.data import format as fmt
from megalign.data import preprocess as preprocess_module
from megalign.data import synthetic, writer
from megalign.data.packed_dataset import PackedDataset
from megalign.data.preprocess import available_cpus, preprocess
from megalign.data.records import OversizedLine, RecordRejected, open_lines, parse_record
from megalign.data.tokenizer_training import CHATML_JINJA
from megalign.errors import MegalignError
from tests.data.test_preprocess import options, private_leftovers, re_escape


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    return synthetic.make_example(out, n_long=2, n_short=30, min_words=40, max_words=200, seed=5)


def good_lines(example):
    return [l for l in example["short"].read_bytes().splitlines() if l.strip()]


def dataset_state(prefix):
    """The seq_length of the complete dataset at prefix, or None when there is none; never half of one."""
    if not fmt.meta_file(prefix).exists():
        assert not any(p.exists() for p in fmt.data_files(prefix)), "data files without their metadata"
        return None
    return PackedDataset(prefix).seq_length  # checks sizes and checksums against the metadata


# ------------------------------------------------------------------------------------------ 1. atomic publish

def failing_nth_replace(monkeypatch, n):
    """os.replace raises on its n-th call from now on (the rename step of publishing, cut short)."""
    real, calls = os.replace, []

    def replace(src, dst, **kw):
        calls.append(dst)
        if len(calls) == n:
            raise OSError("killed while publishing")
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def previous_dataset(directory, tokenizer, example, kind):
    """A prefix in `directory` holding: nothing, a published dataset, or the same as plain files (an older layout,
    or a dataset copied with cp -L). Returns the prefix and the seq_length of what is there."""
    directory.mkdir()
    prefix = str(directory / "ds")
    if kind == "none":
        return prefix, None
    preprocess(options(directory, tokenizer, [example["short"]], seq_length=1024))
    if kind == "plain files":
        for path in fmt.all_files(prefix):
            data = path.read_bytes()
            path.unlink()
            path.write_bytes(data)
        for p in directory.iterdir():
            if p.name.startswith(".ds."):
                os.unlink(p) if p.is_symlink() else shutil.rmtree(p)
    assert dataset_state(prefix) == 1024
    return prefix, 1024


@pytest.mark.parametrize("previous", ["none", "published", "plain files"])
def test_publish_cut_at_any_rename_leaves_the_previous_or_the_new_dataset(tmp_path, bpe_tokenizer_dir, example,
                                                                          monkeypatch, previous):
    def run(prefix, cut_at=0):
        with monkeypatch.context() as m:
            calls = failing_nth_replace(m, cut_at)
            if cut_at:  # as a kill: no clean-up runs, the lock file stays (the kernel drops the flock)
                m.setattr(preprocess_module, "shutil", SimpleNamespace(rmtree=lambda *a, **k: None))
                m.setattr(writer.PrefixLock, "__exit__", lambda self, *exc: os.close(self.fd))
            preprocess(options(tmp_path, bpe_tokenizer_dir, [example["short"]], output_prefix=prefix, seq_length=512,
                               overwrite=True))
        return len(calls)

    renames = run(previous_dataset(tmp_path / "uncut", bpe_tokenizer_dir, example, previous)[0])
    assert renames >= 1
    for k in range(1, renames + 1):
        prefix, old = previous_dataset(tmp_path / f"cut{k}", bpe_tokenizer_dir, example, previous)
        with pytest.raises(OSError, match="killed while publishing"):
            run(prefix, cut_at=k)
        assert dataset_state(prefix) == old  # the commit is the last rename: cut anywhere, the old one stays
        assert private_leftovers(prefix)  # what the killed run left
        run(prefix)  # the next run completes from wherever the cut left it, and clears the rest
        assert dataset_state(prefix) == 512 and not private_leftovers(prefix)
        assert not fmt.lock_file(prefix).exists()


def test_metadata_of_a_fresh_prefix_appears_with_its_data(tmp_path, bpe_tokenizer_dir, example, monkeypatch):
    prefix = str(tmp_path / "ds")
    def killed(path):
        raise OSError("killed")

    monkeypatch.setattr(writer, "fsync_path", killed)  # called on the new files just before the commit
    with pytest.raises(OSError, match="killed"):
        preprocess(options(tmp_path, bpe_tokenizer_dir, [example["short"]]))
    assert dataset_state(prefix) is None and not fmt.rejects_file(prefix).exists()


# ------------------------------------------------------------------------------------------ 2. one run per prefix

def test_a_second_run_on_a_prefix_fails_while_the_first_holds_it(tmp_path, bpe_tokenizer_dir, example):
    opts = options(tmp_path, bpe_tokenizer_dir, [example["short"]])
    with writer.PrefixLock(opts.output_prefix):
        assert fmt.lock_file(opts.output_prefix).read_text().strip() == str(os.getpid())
        with pytest.raises(MegalignError, match=rf"output_prefix .*ds: another preprocessing run holds .*ds\.lock "
                                                rf"\(pid {os.getpid()}\); wait for it to finish or choose another "
                                                "output_prefix"):
            preprocess(opts)
        assert dataset_state(opts.output_prefix) is None
    assert not fmt.lock_file(opts.output_prefix).exists()  # released and removed
    preprocess(opts)
    assert dataset_state(opts.output_prefix) == opts.seq_length
    assert not fmt.lock_file(opts.output_prefix).exists()


# ------------------------------------------------------------------------------------------ 3. inputs are safe

@pytest.mark.parametrize("input_name,prefix_name", [("x.json", "x"), ("x.rejects.jsonl", "x"), ("x.lock", "x"),
                                                    ("link.jsonl", "x")])
def test_an_output_never_overwrites_an_input(tmp_path, bpe_tokenizer_dir, example, input_name, prefix_name):
    source = tmp_path / input_name
    shutil.copy(example["short"], source)
    if input_name == "link.jsonl":  # the input reached through a symlink at another name
        source.unlink()
        shutil.copy(example["short"], tmp_path / "x.bin")
        source.symlink_to(tmp_path / "x.bin")
    before = source.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(MegalignError, match=r"output_prefix .*x would write .*, which is the input .*"
                                                r"choose a prefix whose files are not among the inputs"):
            preprocess(options(tmp_path, bpe_tokenizer_dir, [source], output_prefix=str(tmp_path / prefix_name),
                               overwrite=overwrite))
    assert source.read_bytes() == before


# ------------------------------------------------------------------------------------------ 4. stale scratch

def test_the_next_run_clears_what_killed_runs_left(tmp_path, bpe_tokenizer_dir, example):
    prefix = str(tmp_path / "ds")
    stale = [tmp_path / ".ds.tmp-0123456789abcdef", tmp_path / ".ds.v-fedcba9876543210", tmp_path / ".ds.tmp-k2_x9aqz"]
    others = [tmp_path / ".other.tmp-0123456789abcdef", tmp_path / ".ds.tmp-mine"]
    for d in stale + others:
        d.mkdir()
        (d / "samples.tokens").write_bytes(b"x" * 100)
    opts = options(tmp_path, bpe_tokenizer_dir, [example["short"]])
    with writer.PrefixLock(prefix), pytest.raises(MegalignError, match="another preprocessing run"):
        preprocess(opts)  # a live run's scratch is never touched
    assert all(d.exists() for d in stale)
    preprocess(opts)
    assert not any(d.exists() for d in stale) and all(d.exists() for d in others)
    assert set(private_leftovers(prefix)) == {d.name for d in others}


# ------------------------------------------------------------------------------------------ 5. bad records

def nested(depth):
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


def test_bad_records_are_rejects_never_the_end_of_the_run(tmp_path, bpe_tokenizer_dir, example):
    tokenizer = tmp_path / "tok"
    shutil.copytree(bpe_tokenizer_dir, tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}"
                               "{{ raise_exception('no bombs here') }}{% endif %}{% endfor %}" + CHATML_JINJA)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    good = good_lines(example)[:10]
    boom = json.dumps({"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "a"}]})
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "a"}]})
    lines = good[:5] + [nested(2000), boom.encode(), huge.encode()] + good[5:]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for workers in range(1, min(2, available_cpus()) + 1):
        m = preprocess(options(tmp_path, tokenizer, [path], chat_template="hf", max_record_bytes=5000,
                               max_reject_fraction=0.5, workers=workers,
                               output_prefix=str(tmp_path / f"w{workers}"))).metadata
        c = m["counts"]
        assert c["rejected"] == {"template_error": 1, "too_deeply_nested": 1, "too_large": 1}
        assert c["read"] == 13 == c["kept"] - c["duplicated"] + c["sampled_out"] + 3
        rejects = [json.loads(l) for l in fmt.rejects_file(str(tmp_path / f"w{workers}")).read_text().splitlines()]
        assert [(r["line"], r["reason"]) for r in rejects] == [
            (6, "too_deeply_nested"), (7, "template_error"), (8, "too_large")]
        assert "no bombs here" in rejects[1]["detail"] and "max_record_bytes 5000" in rejects[2]["detail"]


def test_parse_and_read_bounds(tmp_path):
    with pytest.raises(RecordRejected, match="too_deeply_nested"):
        parse_record(nested(2000))
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"a" * 10 + b"\n" + b"b" * 11 + b"\n" + b"c" * 10 + b"\r\n" + b"d" * 30 + b"\n" + b"e" * 11)
    assert list(open_lines(path, max_bytes=10)) == [
        b"a" * 10, OversizedLine(11, 10), b"c" * 10, OversizedLine(30, 10), OversizedLine(11, 10)]
    assert list(open_lines(path)) == [b"a" * 10, b"b" * 11, b"c" * 10, b"d" * 30, b"e" * 11]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gzip_input_is_an_error_naming_file_and_line(tmp_path, bpe_tokenizer_dir, example, damage):
    gz = tmp_path / "in.jsonl.gz"
    data = gzip.compress(b"\n".join(good_lines(example) * 40) + b"\n", mtime=0)
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray(data)
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0x5A
        data = bytes(data)
    gz.write_bytes(data)
    with pytest.raises(MegalignError, match=r"in\.jsonl\.gz: the gzip stream is truncated or corrupt after line \d+ "):
        preprocess(options(tmp_path, bpe_tokenizer_dir, [gz]))
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl.gz"]


# ------------------------------------------------------------------------------------------ 6. option bounds

@pytest.mark.parametrize("change,message", [
    ({"ratios": [0]}, "ratios [0] are all 0, which keeps nothing; give at least one > 0"),
    ({"workers": available_cpus() + 1}, f"workers is {available_cpus() + 1}, but this process may use "
                                        f"{available_cpus()} CPUs; give at most {available_cpus()}"),
    ({"seq_length": 2**31}, "seq_length must be at most 2**31-1 (2147483647), got 2147483648"),
    ({"max_record_bytes": 0}, "max_record_bytes must be at least 1"),
    ({"inputs": ["{tmp}"]}, "inputs {tmp} is a directory; give the JSONL files in it"),
    ({"output_prefix": "{tmp}/"}, "output_prefix {tmp}/ ends with a slash; it names files, not a directory: "
                                  "give e.g. {tmp}/dataset"),
    ({"output_prefix": "{tmp}"}, "output_prefix {tmp} is a directory; give a prefix of files in it, e.g. {tmp}/dataset"),
])
def test_option_bounds(tmp_path, bpe_tokenizer_dir, example, change, message):
    opts = options(tmp_path, bpe_tokenizer_dir, [example["short"]])
    for k, v in change.items():
        setattr(opts, k, json.loads(json.dumps(v).replace("{tmp}", str(tmp_path))))
    with pytest.raises(MegalignError, match=re_escape(message.replace("{tmp}", str(tmp_path)))):
        preprocess(opts)
    assert list(tmp_path.iterdir()) == []


def test_the_rejects_of_a_failed_run_do_not_block_the_rerun(tmp_path, bpe_tokenizer_dir, example):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(good_lines(example)[:10] + [b"{not json"]) + b"\n")
    with pytest.raises(MegalignError, match="max_reject_fraction 0.01 is exceeded"):
        preprocess(options(tmp_path, bpe_tokenizer_dir, [path]))
    assert fmt.rejects_file(str(tmp_path / "ds")).exists() and not fmt.meta_file(str(tmp_path / "ds")).exists()
    m = preprocess(options(tmp_path, bpe_tokenizer_dir, [path], max_reject_fraction=0.5)).metadata
    assert m["counts"]["rejected"] == {"malformed_json": 1} and dataset_state(str(tmp_path / "ds")) == 1024
    assert len(fmt.rejects_file(str(tmp_path / "ds")).read_text().splitlines()) == 1


def test_the_command_line_names_flags(tmp_path, bpe_tokenizer_dir, example, capsys):
    from megalign.data.cli import preprocess_main

    with writer.PrefixLock(str(tmp_path / "ds")), pytest.raises(SystemExit) as exit_:
        preprocess_main(["--input", str(example["short"]), "--tokenizer", str(bpe_tokenizer_dir),
                         "--chat-template", "chatml", "--seq-length", "512", "--output-prefix", str(tmp_path / "ds"),
                         "--max-record-bytes", "100000", "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output-prefix ") and "choose another --output-prefix" in err
    assert len(err.strip().splitlines()) == 1
