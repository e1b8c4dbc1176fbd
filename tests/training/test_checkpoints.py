"""Checkpoints through the real training entry point (torchrun, gloo, CPU fp32):

- a run stopped after k steps and resumed logs the same losses, bit for bit, as one that never stopped, with
  dropout on (so RNG streams must be restored too);
- SIGTERM mid-run: the run finishes its step, saves and exits; resuming gives the same losses again;
- SIGKILL in the middle of a save leaves the previous checkpoint published and the run resumable;
- a TP=2 checkpoint resumes at TP=1, PP=2 and DP=2 with the same next-step loss;
- a truncated, differently shaped or other-data checkpoint is a one-line error naming the problem.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalign.checkpoint.store import CheckpointStore, read_manifest
from megalign.training.status import read_status

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
# dropout makes the resumed run depend on the restored RNG streams
EXACT = ("parallel.tp=2", f"training.steps={STEPS}", "training.global_batch=2", "model.hidden_dropout=0.1",
         "model.attention_dropout=0.1")


def command(nproc: int, dataset: str, out: Path, *overrides: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "megalign.train", "--config", str(ROOT / "examples" / "tiny.yaml"),
            f"data.path={dataset}", f"run.output_dir={out}", "run.progress=false", *overrides]


def train(nproc: int, dataset: str, out: Path, *overrides: str, expect_ok: bool = True):
    done = subprocess.run(command(nproc, dataset, out, *overrides), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def metrics(out: Path) -> dict[int, dict]:
    """The logged records by step; each step is logged once (a resumed run drops records after its checkpoint)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: r for r in records}


def same_losses(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(2, dataset, out, *EXACT)
    return metrics(out)


def test_stop_then_resume_equals_an_uninterrupted_run(dataset, tmp_path, straight):
    train(2, dataset, tmp_path, *EXACT, "run.stop_at_step=3")
    assert sorted(metrics(tmp_path)) == [1, 2, 3]
    assert read_status(tmp_path)["status"] == "paused" and read_status(tmp_path)["step"] == 3
    assert CheckpointStore(tmp_path / "checkpoints").latest().name == "step_0000003"
    done = train(2, dataset, tmp_path, *EXACT)
    assert "resumed from" in done.stdout and "at step 3" in done.stdout
    same_losses(metrics(tmp_path), straight)
    assert read_status(tmp_path)["status"] == "finished"


def _wait_for(predicate, timeout: float = 120.0, every: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(every)


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_saves_after_the_step_and_the_resume_is_exact(dataset, tmp_path, straight):
    run = subprocess.Popen(command(2, dataset, tmp_path, *EXACT), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _logged_steps(tmp_path) >= 2 or run.poll() is not None)
    run.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers, as SLURM's does to the job
    output, _ = run.communicate(timeout=120)
    stopped_at = _logged_steps(tmp_path)
    assert 2 <= stopped_at < STEPS, output[-3000:]
    assert f"stopped by SIGTERM after step {stopped_at}" in output
    assert CheckpointStore(tmp_path / "checkpoints").latest().name == f"step_{stopped_at:07d}"
    status = read_status(tmp_path)  # torchrun turns a worker's 75 into its own 1: the file keeps the status
    assert status["status"] == "stopped" and status["exit_code"] == 75 and status["step"] == stopped_at
    train(2, dataset, tmp_path, *EXACT)
    same_losses(metrics(tmp_path), straight)


def test_a_signalled_run_without_a_launcher_exits_with_the_resumable_status(dataset, tmp_path):
    """One process started as srun starts each rank: its exit status itself says "stopped, resumable" (75)."""
    run = subprocess.Popen(command(1, dataset, tmp_path, "training.steps=50", "training.global_batch=2"), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _logged_steps(tmp_path) >= 1 or run.poll() is not None)
    run.send_signal(signal.SIGUSR1)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 75, output[-3000:]
    assert read_status(tmp_path)["status"] == "stopped"
    assert CheckpointStore(tmp_path / "checkpoints").latest() is not None


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(dataset, tmp_path, straight):
    store = CheckpointStore(tmp_path / "checkpoints")
    run = subprocess.Popen(command(2, dataset, tmp_path, *EXACT, "checkpoint.interval=2"), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: store.partial_dir(4).exists() or run.poll() is not None)
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and every worker, mid-save
    run.wait()
    assert store.partial_dir(4).exists(), "the kill did not land during the save of step 4"
    assert store.latest().name == "step_0000002"
    read_manifest(store.latest())  # complete and whole
    train(2, dataset, tmp_path, *EXACT, "checkpoint.interval=2")
    assert not store.partial_dir(4).exists()
    assert [p.name for p in store.complete()] == ["step_0000004", "step_0000006"]  # keep=2
    same_losses(metrics(tmp_path), straight)


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MiB file system (tmpfs): room for one checkpoint of the tiny model (15.5 MiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_during_a_save_is_named_and_the_previous_checkpoint_stays(dataset, tmp_path, small_disk):
    out = tmp_path / "run"
    done = train(1, dataset, out, "training.steps=3", "training.global_batch=2", "checkpoint.interval=1",
                 f"checkpoint.dir={small_disk}", expect_ok=False)
    assert done.returncode == 1, done.stderr[-3000:]  # a failure worth retrying, not a bad config
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint of step 2: no space left on the device of ") and \
        "step_0000001 is still the newest checkpoint" in last and "MiB free; a checkpoint needs about" in last, last
    store = CheckpointStore(small_disk)
    assert store.latest().name == "step_0000001" and not list(small_disk.glob(".partial-*"))
    read_manifest(store.latest())  # whole
    assert read_status(out)["status"] == "failed"


def test_a_tp2_checkpoint_resumes_at_tp1_pp2_and_dp2(dataset, tmp_path):
    base = ("training.steps=4", "training.global_batch=2")
    source = tmp_path / "tp2"
    train(2, dataset, source, *base, "parallel.tp=2", "run.stop_at_step=3")
    resume = f"checkpoint.resume_from={source / 'checkpoints'}"
    step4 = {}
    for name, nproc, layout in (("tp2", 2, "parallel.tp=2"), ("tp1", 1, "parallel.tp=1"),
                                ("pp2", 2, "parallel.pp=2"), ("dp2", 2, "parallel.tp=1")):
        out = tmp_path / f"from_tp2_{name}"
        done = train(nproc, dataset, out, *base, layout, resume)
        assert "resumed from" in done.stdout
        assert sorted(metrics(out)) == [4]
        step4[name] = metrics(out)[4]
    reference = step4.pop("tp2")
    for name, record in step4.items():
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-5), name
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), name
        assert record["lr"] == reference["lr"], name


def test_bad_checkpoints_are_one_line_errors(dataset, other_dataset, tmp_path):
    source = tmp_path / "source"
    train(1, dataset, source, "training.steps=2", "training.global_batch=2")
    ckpt = CheckpointStore(source / "checkpoints").latest()
    cases = []

    shape = train(1, dataset, tmp_path / "shape", "training.steps=3", "training.global_batch=2",
                  "model.hidden_size=64", f"checkpoint.resume_from={ckpt}", expect_ok=False)
    cases.append((shape, "holds a model of another shape: model.hidden_size: checkpoint 128, config 64"))

    data = train(1, other_dataset, tmp_path / "data", "training.steps=3", "training.global_batch=2",
                 f"checkpoint.resume_from={ckpt}", expect_ok=False)
    cases.append((data, "was trained on other data"))

    index = ckpt / ".metadata"  # megatron's index of the shards, damaged but the same size
    index.write_bytes(b"\0" * index.stat().st_size)
    damaged = train(1, dataset, source, "training.steps=3", "training.global_batch=2", expect_ok=False)
    cases.append((damaged, ".metadata fail their checksum (damaged after they were written)"))

    manifest_file = ckpt / "megalign.json"  # a checkpoint from before checksums: megatron's own read fails
    manifest = json.loads(manifest_file.read_text())
    del manifest["checksums"]
    manifest_file.write_text(json.dumps(manifest))
    unchecked = train(1, dataset, source, "training.steps=3", "training.global_batch=2", expect_ok=False)
    cases.append((unchecked, "cannot be read"))

    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    truncated = train(1, dataset, source, "training.steps=3", "training.global_batch=2", expect_ok=False)
    cases.append((truncated, f"{shard.name} has 100 bytes, the manifest says"))

    for done, message in cases:
        assert done.returncode == 2, done.stderr[-3000:]
        assert read_status(tmp_path / "shape")["status"] == "invalid"
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: checkpoint ") and message in last, last


def test_init_from_starts_a_new_run_from_the_weights(dataset, tmp_path):
    # One global batch = every pack, so each step's loss is over the same packs whatever their order: a new run
    # from the weights of step 2 has, at its step 1, the loss the source had at step 3.
    packs = json.loads(Path(dataset + ".json").read_text())["num_packs"]
    source, fresh = tmp_path / "source", tmp_path / "fresh"
    train(1, dataset, source, "training.steps=4", f"training.global_batch={packs}", "checkpoint.interval=2")
    done = train(1, dataset, fresh, "training.steps=4", f"training.global_batch={packs}", "run.stop_at_step=1",
                 f"checkpoint.init_from={source / 'checkpoints' / 'step_0000002'}")
    assert "weights from" in done.stdout
    source_losses, fresh_losses = metrics(source), metrics(fresh)
    assert fresh_losses[1]["loss"] == pytest.approx(source_losses[3]["loss"], rel=1e-6)
    assert fresh_losses[1]["loss"] != pytest.approx(source_losses[1]["loss"], rel=1e-3)
    assert fresh_losses[1]["lr"] == source_losses[1]["lr"]  # a new run: the schedule starts over
