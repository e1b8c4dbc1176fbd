"""The training entry point: a short run writes metrics, log, TensorBoard and a checkpoint; bad configs are
one-line errors before any process group starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "sequences", "tokens", "tokens_per_s", "tflops_per_gpu", "dp_imbalance",
               "host_seconds"}


def train(*args):
    return subprocess.run([sys.executable, "-m", "megalign.train", "--config", str(ROOT / "examples" / "tiny.yaml"),
                           *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_short_run_writes_metrics_log_tensorboard_and_checkpoint(dataset, other_dataset, tmp_path):
    out = tmp_path / "run"
    done = train(f"data.path={dataset}", f"run.output_dir={out}", "training.steps=3", "training.global_batch=2",
                 f"data.valid_path={other_dataset}", "training.eval_interval=2", "training.eval_buckets=[128,512]")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(METRIC_KEYS <= set(r) for r in records)
    # validation every 2 steps and after the last, overall and per sample-length bucket
    assert ["valid_loss" in r for r in records] == [False, True, True]
    held_out = json.loads(Path(other_dataset + ".json").read_text())
    assert records[1]["valid_sequences"] == held_out["counts"]["kept"]
    assert {"valid_loss/<128", "valid_loss/128-512"} <= set(records[1]) and records[1]["valid_loss"] > 0
    assert all(r["tokens"] > 0 and r["sequences"] >= 2 and r["tflops_per_gpu"] > 0 for r in records)
    assert (out / "train.log").read_text().count("step ") >= 3
    assert list((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "step_0000003" / "metadata.json").is_file()
    assert "checkpoint:" in done.stdout and "metrics:" in done.stdout
    assert "vocab_size: 600" in (out / "config.yaml").read_text()  # taken from the dataset's tokenizer
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "finished" and status["exit_code"] == 0 and status["step"] == 3
    assert status["checkpoint"].endswith("step_0000003")


@pytest.mark.parametrize("override,message", [
    ("training.lrr=1", "error: config key training.lrr: Key 'lrr' not in 'TrainingConfig'"),
    ("training.eval_interval=5", "error: config key training.eval_interval=5 needs data.valid_path"),
    ("data.valid_path=/nowhere/ds", "error: config key data.valid_path: /nowhere/ds.json not found"),
    ("parallel.tp=2", "error: config keys parallel.tp*pp*cp = 2 must divide the world size 1"),
])
def test_bad_config_is_a_one_line_error(dataset, tmp_path, override, message):
    done = train(f"data.path={dataset}", f"run.output_dir={tmp_path}", override)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(message)
    assert not list(tmp_path.iterdir())


def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_saves_nothing(dataset, tmp_path):
    out = tmp_path / "run"
    done = train(f"data.path={dataset}", f"run.output_dir={out}", "training.steps=8", "training.global_batch=2",
                 "training.lr=1e9", "training.warmup_fraction=0", "training.clip_grad=0", "run.progress=false")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "nothing was updated or saved" in last, last
    step = int(last.split()[2].rstrip(":"))
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step))  # every finite step, not the bad one
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step_*"))
    assert json.loads((out / "run_status.json").read_text())["status"] == "invalid"


def test_nonfinite_steps_can_be_skipped(dataset, tmp_path):
    out = tmp_path / "run"
    done = train(f"data.path={dataset}", f"run.output_dir={out}", "training.steps=6", "training.global_batch=2",
                 "training.lr=1e9", "training.warmup_fraction=0", "training.clip_grad=0", "run.progress=false",
                 "training.on_nonfinite=skip")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and any(r["skipped"] for r in records)
    assert "not finite, skipped" in done.stdout
