"""The evaluation run: items.jsonl as items finish, resume of a half-done run, failures counted apart; the
command line end to end on a tiny Hugging Face model with the hf backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError
from megalign.eval import tasks
from megalign.eval.backends import Generation
from megalign.eval.run import evaluate, summarize

ROOT = Path(__file__).resolve().parents[2]


class Stopped(Exception):
    pass


def test_a_resumed_evaluation_generates_only_the_missing_items(bpe_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    opts = tasks.TaskOptions(max_length=1024, ruler_lengths=(1024,), ruler_samples=2)
    items = tasks.make_items(["ruler-synthetic"], tokenizer, opts)
    assert len(items) == 2 * 6
    asked = []

    def first_run(item):
        asked.append(item.id)
        if len(asked) == 3:
            raise MegalignError("the server answered 500 five times")  # recorded as failed, not scored
        if len(asked) == 6:
            raise Stopped()  # the process dies mid-run
        return Generation(" ".join(item.references), 10, 3)  # a perfect answer

    with pytest.raises(Stopped):
        evaluate(items, first_run, tasks.score, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [r["status"] for r in lines] == ["ok", "ok", "failed", "ok", "ok"]
    assert lines[2]["score"] is None and "500 five times" in lines[2]["reason"]

    again = []
    resumed = evaluate(items, lambda item: again.append(item.id) or Generation(" ".join(item.references), 10, 3),
                       tasks.score, tmp_path, progress=False)
    assert again == [asked[2]] + [i.id for i in items[5:]]  # the failed one and those never reached
    assert resumed.generated == len(items) - 4
    assert [r["id"] for r in resumed.records] == [i.id for i in items]
    summary = summarize(resumed.records)
    assert all(t["score"] == 100.0 and t["failed"] == 0 for t in summary.values())

    partial = summarize([*resumed.records[:2], {"task": items[2].task, "id": "x", "status": "failed"}])
    assert partial[items[2].task]["failed"] == 1


def test_unknown_tasks_are_named():
    with pytest.raises(MegalignError, match="nope: unknown; valid: needle, ruler-synthetic"):
        tasks.make_items(["nope"], None, tasks.TaskOptions(max_length=512))


def test_the_command_line_evaluates_a_needle_grid_with_the_hf_backend(tiny_hf_model, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "megalign.eval", "--model", str(tiny_hf_model), "--backend", "hf", "--tasks",
               "needle", "--max-length", "600", "--needle-lengths", "2", "--needle-depths", "2", "--out", str(out),
               "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    for r in records:
        assert r["meta"]["actual_length"] == r["meta"]["requested_length"]
        assert r["prompt_tokens"] > r["meta"]["actual_length"]  # the context plus the question and the template
        assert 0 <= r["score"] <= 1 and r["new_tokens"] <= 64
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["needle"]["items"] == 4
    assert (out / "needle.png").stat().st_size > 0 and "heatmap:" in done.stdout
    # a second run finds everything done: nothing generated again
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["settings"]["generated"] == 0
    # other settings into the same OUT: refused, the cached items are not theirs
    other = subprocess.run([*command, "--seed", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 2 and "holds an evaluation with other settings" in other.stderr


def test_a_model_that_is_neither_hf_nor_megalign_is_one_line(tmp_path):
    (tmp_path / "junk").mkdir()
    done = subprocess.run([sys.executable, "-m", "megalign.eval", "--model", str(tmp_path / "junk"), "--tasks",
                           "needle", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "is neither a Hugging Face model (no config.json) nor a megalign checkpoint" in done.stderr


def test_the_command_line_runs_longbench_from_the_users_checkout(tiny_hf_model, tmp_path):
    from tests.eval.test_longbench import _checkout

    checkout = _checkout(tmp_path / "LongBench")
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "megalign.eval", "--model", str(tiny_hf_model), "--tasks",
                           "longbench", "--longbench-dir", str(checkout), "--longbench-tasks", "hotpotqa", "trec",
                           "--max-length", "1000", "--out", str(out), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in records}) == ["longbench/hotpotqa", "longbench/trec"] and len(records) == 6
    assert all(r["status"] == "ok" and 0 <= r["score"] <= 1 for r in records)
    results = json.loads((out / "results.json").read_text())["tasks"]
    assert results["longbench/hotpotqa"]["items"] == 3 and "longbench averages" in results


def test_the_command_line_runs_longbench_v2_and_reports_its_table(tiny_hf_model, tmp_path):
    from tests.eval.test_longbench_v2 import _checkout, _record

    checkout = _checkout(tmp_path / "LongBench", [_record(0), _record(1, difficulty="hard", length="long")])
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "megalign.eval", "--model", str(tiny_hf_model), "--tasks",
                           "longbench-v2", "--longbench-v2-dir", str(checkout), "--max-length", "1000", "--out",
                           str(out), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["longbench-v2"] * 2 and all(r["status"] == "ok" for r in records)
    assert all(r["new_tokens"] <= 128 for r in records)
    table = json.loads((out / "results.json").read_text())["tasks"]["longbench-v2 table"]["longbench-v2"]
    assert table["items"] == {"Overall": 2, "Easy": 1, "Hard": 1, "Short": 1, "Medium": 0, "Long": 1}
    from megalign.eval.compare import flat_scores

    rows = flat_scores(json.loads((out / "results.json").read_text()))
    assert set(rows) == {"longbench-v2", *(f"longbench-v2 accuracy {c}" for c in ("Overall", "Easy", "Hard", "Short",
                                                                                "Long"))}
