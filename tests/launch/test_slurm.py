"""megalign's Slurm launch on a real Slurm cluster (munge + slurmctld + two slurmd nodes on loopback, started by
the `slurm` fixture): jobs submitted with megalign-submit, run by launch/slurm/*.sbatch, one srun task per rank.

- a 2-node job (TP=2 x DP=2 across the nodes), signalled mid-run as a time limit does, saves, requeues itself,
  resumes and finishes with the per-step losses of an uninterrupted local torchrun run, two attempts recorded
  and nothing logged twice;
- a rank killed with SIGKILL in every attempt: the job fails after two attempts without progress, and its log
  names the rank and the cause;
- preprocess -> train -> eval runs through the dependencies; the evaluation finds the trained checkpoint's
  tokenizer and chat template itself.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalign.launch.profiles import available
from tests.launch.conftest import REPO, megalign_submit, write_config

pytestmark = pytest.mark.slow


def _submit_train(slurm, cwd: Path, *args: str) -> list[str]:
    done = megalign_submit("train", "--cluster", "local-cpu", *args, cwd=cwd, env=slurm.env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.2)
    return found


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _torchrun(config: Path, nproc: int, out: Path, cwd: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    "-m", "megalign.train", "--config", str(config), f"run.output_dir={out}"],
                   cwd=cwd, env=env, check=True, capture_output=True, timeout=300)
    return _lines(out / "metrics.jsonl")


def test_a_signalled_two_node_job_requeues_resumes_and_equals_an_uninterrupted_run(slurm, dataset, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "tp2.yaml", dataset, run, parallel={"tp": 2})
    job, = _submit_train(slurm, tmp_path, "--nodes", "2", "--tasks-per-node", "2", "--config", str(config))

    # The time limit's signal (--signal=USR1@N), sent now: after two steps of the first attempt.
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_lines(run / "metrics.jsonl")) >= 2, 240,
              "second step")
    slurm.run(["scancel", "--signal=USR1", job])
    state = slurm.wait(job, timeout=300, restarts=1)
    assert state["JobState"] == "COMPLETED", state

    attempts = _lines(run / "attempts.jsonl")
    assert [(a["status"], a["action"], a["restart"]) for a in attempts] == [
        ("stopped", "requeue", 0), ("finished", "done", 1)]
    first, second = attempts
    assert first["nodes"] == second["nodes"] == "n[1-2]" and first["tasks"] == 4
    assert first["first_step"] == 1 and first["last_step"] == first["checkpoint_step"] >= 2
    assert second["first_step"] == first["last_step"] + 1 and second["last_step"] == 6
    assert sorted(p.name for p in (run / "logs").glob("train-*.log")) == [f"train-{job}-r0.log", f"train-{job}-r1.log"]
    assert json.loads((run / "run_status.json").read_text())["status"] == "finished"

    metrics = _lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # nothing logged twice, nothing missing
    reference = _torchrun(config, 4, tmp_path / "torchrun", tmp_path)
    for got, want in zip(metrics, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), got["step"]
    job_log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "ended stopped (stopped by SIGUSR1)" in job_log and "requeue:" in job_log


def test_a_rank_killed_in_every_attempt_fails_the_job_and_the_log_names_it(slurm, dataset, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "tp2.yaml", dataset, run, parallel={"tp": 2}, training={"steps": 50})
    job, = _submit_train(slurm, tmp_path, "--nodes", "2", "--tasks-per-node", "1", "--config", str(config))
    killed = set()
    deadline = time.monotonic() + 240
    while slurm.job_state(job).get("JobState") not in ("FAILED", "COMPLETED", "CANCELLED"):
        assert time.monotonic() < deadline, "the job neither failed nor finished"
        for log in (run / "logs").glob(f"train-{job}-r*.log"):
            if log.name not in killed and "step 1/" in log.read_text():  # mid-run: a step done, no checkpoint
                for pid in slurm.processes(SLURM_JOB_ID=job, SLURM_PROCID="1"):
                    if b"megalign.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                killed.add(log.name)
        time.sleep(0.2)
    state = slurm.wait(job)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", state

    attempts = _lines(run / "attempts.jsonl")
    assert [a["action"] for a in attempts] == ["requeue", "stop"]
    for a in attempts:  # rank 0 reports the lost connection (failed), or is killed before it can (killed)
        assert a["status"] in ("failed", "killed") and a["checkpoint_step"] is None, a
        assert a["failure"].startswith("rank 1 on n2: Killed"), a["failure"]
    assert "2 attempts in a row failed without a new checkpoint" in attempts[1]["why"]
    job_log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "first failure: rank 1 on n2: Killed (SIGKILL" in job_log


def test_a_hung_rank_ends_the_job_after_the_collective_timeout_naming_it(slurm, dataset, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "tp2.yaml", dataset, run, parallel={"tp": 2, "timeout_minutes": 0.2},
                          training={"steps": 50})
    profile = tmp_path / "once.yaml"  # the local cluster, but no second try after a failure without progress
    profile.write_text(available()["local-cpu"].read_text().replace("max_stalled: 2", "max_stalled: 1"))
    done = megalign_submit("train", "--cluster", str(profile), "--nodes", "2", "--tasks-per-node", "1", "--config",
                           str(config), "parallel.timeout_minutes=0.2", cwd=tmp_path, env=slurm.env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.split()[0]
    log = run / "logs" / f"train-{job}-r0.log"
    _wait_for(lambda: log.is_file() and "step 1/" in log.read_text(), 240, "first step")
    for pid in slurm.processes(SLURM_JOB_ID=job, SLURM_PROCID="1"):
        if b"megalign.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGSTOP)  # alive, holding its sockets open, answering nothing
    state = slurm.wait(job, timeout=120)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", state
    attempt, = _lines(run / "attempts.jsonl")
    assert attempt["action"] == "stop"
    assert attempt["failure"].startswith("rank 1 on n2 hung: rank 0's collective timed out waiting"), attempt


def test_preprocess_then_train_runs_through_the_dependency(slurm, bpe_tokenizer_dir, tmp_path):
    from megalign.data import synthetic

    inputs = synthetic.make_example(tmp_path, n_long=2, n_short=20, min_words=40, max_words=120, seed=3)
    prefix = tmp_path / "data" / "chained"
    prefix.parent.mkdir()
    run = tmp_path / "run"
    config = write_config(tmp_path / "one.yaml", prefix, run, training={"steps": 2, "global_batch": 2})
    preprocess = (f"--input {inputs['long']} {inputs['short']} --tokenizer {bpe_tokenizer_dir} "
                  "--chat-template chatml --seq-length 1024")
    evaluation = "--tasks needle --max-length 600 --needle-lengths 1 --needle-depths 2 --device cpu"
    prep_job, train_job, eval_job = _submit_train(slurm, tmp_path, "--nodes", "1", "--config", str(config),
                                                  "--preprocess", preprocess, "--eval", evaluation)
    prep_state = slurm.wait(prep_job)
    train_state = slurm.wait(train_job, timeout=240)
    eval_state = slurm.wait(eval_job, timeout=240)
    assert prep_state["JobState"] == "COMPLETED" and train_state["JobState"] == "COMPLETED", (prep_state, train_state)
    assert eval_state["JobState"] == "COMPLETED", (eval_state, (run / "eval" / "logs").iterdir())
    assert train_state["StartTime"] >= prep_state["EndTime"] and eval_state["StartTime"] >= train_state["EndTime"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["tasks"]["needle"]["items"] == 2 and results["tasks"]["needle"]["failed"] == 0
    assert (prefix.parent / "chained.json").is_file()
    assert json.loads((run / "run_status.json").read_text())["status"] == "finished"
    prep_log = (run / "logs" / f"preprocess-{prep_job}.out").read_text()
    usable = min(4, len(os.sched_getaffinity(0)))  # the CPUs Slurm gave the job (4), where this machine has them
    assert f"--workers {usable}" in prep_log


def test_a_signalled_evaluation_requeues_and_generates_only_the_missing_items(slurm, tiny_hf_model, tmp_path):
    """The time limit's signal to eval.sbatch (--signal=B:USR1) mid-run: the task stops, the job requeues, the
    second attempt continues from OUT/items.jsonl: every item once, none generated twice."""
    model = tiny_hf_model
    out = tmp_path / "eval"
    done = megalign_submit("eval", "--cluster", "local-cpu", "--", "--model", str(model), "--tasks", "needle",
                           "--max-length", "800", "--needle-lengths", "6", "--needle-depths", "6", "--device", "cpu",
                           "--out", str(out), cwd=tmp_path, env=slurm.env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.split()[-1]
    items = out / "items.jsonl"
    _wait_for(lambda: items.is_file() and len(_lines(items)) >= 3, 240, "third item")
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    state = slurm.wait(job, timeout=300, restarts=1)
    assert state["JobState"] == "COMPLETED", state
    records = _lines(items)
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records}) and len(records) == 36
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["needle"]["items"] == 36 and 0 < results["settings"]["generated"] < 36
    log = (out / "logs" / f"eval-{job}.out").read_text()
    assert "got SIGUSR1; stopping the evaluation" in log and "(restart 1)" in log


def test_sharded_text_preprocessing_merges_into_one_runs_bytes_then_trains(slurm, bpe_tokenizer_dir, tmp_path):
    """Stage 1 of the two-stage recipe on Slurm: a job array of 2 shards of text documents, the merge job after
    it, training (token loss) after the merge; the merged dataset equals one local run's, file for file."""
    from megalign.data import format as fmt
    from megalign.data import synthetic
    from megalign.data.preprocess import PreprocessOptions, preprocess

    docs = synthetic.make_text_example(tmp_path, n_long=4, n_short=30, min_words=200, max_words=700, seed=5)
    prefix = tmp_path / "data" / "longtext"
    prefix.parent.mkdir()
    run = tmp_path / "run"
    config = write_config(tmp_path / "stage1.yaml", prefix, run,
                          model={"rotary_base": 2000000}, training={"steps": 2, "global_batch": 2, "loss": "token"})
    args = (f"--input {docs['long']} {docs['short']} --ratios 1 0.5 --tokenizer {bpe_tokenizer_dir} "
            "--seq-length 512")
    array, merge, train = _submit_train(slurm, tmp_path, "--nodes", "1", "--config", str(config),
                                        "--preprocess-shards", "2", "--preprocess", args)
    train_state = slurm.wait(train, timeout=300)
    merge_state = slurm.wait(merge)
    assert merge_state["JobState"] == "COMPLETED" and train_state["JobState"] == "COMPLETED", (merge_state,
                                                                                                train_state)
    assert train_state["StartTime"] >= merge_state["EndTime"]
    logs = run / "logs"
    assert sorted(p.name for p in logs.glob("preprocess-*.out")) == [f"preprocess-{array}_{i}.out" for i in (0, 1)]
    for i in (0, 1):
        assert f"array task {i} of 2" in (logs / f"preprocess-{array}_{i}.out").read_text()
    single = preprocess(PreprocessOptions(inputs=[str(docs["long"]), str(docs["short"])], ratios=[1, 0.5],
                                          tokenizer=str(bpe_tokenizer_dir), seq_length=512,
                                          output_prefix=str(tmp_path / "single"), progress=False))
    for ours, theirs in zip(fmt.all_files(single.prefix), fmt.all_files(str(prefix))):
        assert ours.read_bytes() == theirs.read_bytes(), theirs
    assert not list(prefix.parent.glob("longtext.shard-*"))  # the merge removed the parts
    assert json.loads((run / "run_status.json").read_text())["status"] == "finished"
