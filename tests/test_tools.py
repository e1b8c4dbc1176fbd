"""The command-line tools: one-line errors with a non-zero exit, a summary, inspect and its plot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalign.data import synthetic

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def short_jsonl(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools")
    return synthetic.make_example(out, n_long=3, n_short=30, min_words=50, max_words=200)["short"]


@pytest.mark.parametrize("args,message", [
    (["--chat-template", "vicuna"], "--chat-template: invalid choice: 'vicuna' (choose from 'llama2', 'llama3'"),
    (["--input", "/missing.jsonl"], "error: --input /missing.jsonl: no such file"),
    (["--seq-length", "1"], "error: --seq-length must be at least 2, got 1"),
    (["--tokenizer", "/missing/tokenizer.json"], "error: tokenizer /missing/tokenizer.json does not exist"),
])
def test_preprocess_errors_are_one_line_and_nonzero(tmp_path, bpe_tokenizer_dir, short_jsonl, args, message):
    base = {"--input": short_jsonl, "--tokenizer": bpe_tokenizer_dir, "--chat-template": "chatml",
            "--seq-length": 512, "--output-prefix": tmp_path / "ds"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = run_tool("preprocess_data.py", *[x for kv in base.items() for x in kv])
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_preprocess_then_inspect_with_plot(tmp_path, bpe_tokenizer_dir, short_jsonl):
    prefix = tmp_path / "ds"
    result = run_tool("preprocess_data.py", "--input", short_jsonl, "--tokenizer", bpe_tokenizer_dir,
                      "--chat-template", "llama3", "--seq-length", 512, "--output-prefix", prefix,
                      "--packing", "ffs", "--workers", min(2, len(os.sched_getaffinity(0))))
    assert result.returncode == 0, result.stderr
    assert "records: read 30, kept 30 samples" in result.stdout and "tokens/s" in result.stdout
    assert "Warning" not in result.stderr
    shown = run_tool("inspect_dataset.py", prefix, "--plot", tmp_path / "stats.png")
    assert shown.returncode == 0, shown.stderr
    assert "packing      ffs at 512 tokens" in shown.stdout and "length histogram:" in shown.stdout
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = run_tool("inspect_dataset.py", tmp_path / "nothing")
    assert missing.returncode == 2 and "nothing.json not found" in missing.stderr
