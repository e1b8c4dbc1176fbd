"""The batch script's decisions without a cluster: when to requeue, when to stop, and which failure came first."""

import pytest

from megalign.launch.attempts import Attempt, TaskEnd, decide, first_failure, srun_task_ends
from megalign.parallel.launcher import adopt_launcher_env


def attempt(status: str, restart: int = 0, progressed: bool = False, checkpoint_step=None) -> Attempt:
    return Attempt(job_id="7", restart=restart, nodes="n[1-2]", tasks=4, start="", end="", first_step=None,
                   last_step=None, checkpoint_step=checkpoint_step, exit_code=0, status=status, reason="",
                   failure=None, progressed=progressed)


def test_finished_and_paused_runs_are_done():
    for status in ("finished", "paused"):
        assert decide(attempt(status), [], max_restarts=5, max_stalled=2)[0] == "done"


def test_a_stopped_run_is_requeued_until_the_restart_limit():
    assert decide(attempt("stopped", restart=4, progressed=True), [], 5, 2)[0] == "requeue"
    action, why = decide(attempt("stopped", restart=5, progressed=True), [], 5, 2)
    assert action == "stop" and "MEGALIGN_MAX_RESTARTS=5" in why


def test_bad_config_or_input_is_never_retried():
    action, why = decide(attempt("invalid"), [], 5, 2)
    assert action == "stop" and "retrying cannot help" in why


def test_failures_without_progress_stop_after_max_stalled_in_a_row():
    assert decide(attempt("failed"), [], 5, 2)[0] == "requeue"  # one failure may be the machine's: once more
    assert decide(attempt("killed", restart=1), [attempt("failed")], 5, 2)[0] == "stop"
    # progress in between resets the count; so does a signalled stop
    assert decide(attempt("failed", 2), [attempt("failed"), attempt("failed", 1, progressed=True)], 5, 2)[0] == \
        "requeue"
    assert decide(attempt("failed", 2), [attempt("failed"), attempt("stopped", 1, progressed=True)], 5, 2)[0] == \
        "requeue"
    assert decide(attempt("failed", 2), [attempt("failed"), attempt("failed", 1)], 5, 3)[0] == "stop"


def test_a_failure_after_a_new_checkpoint_is_requeued():
    action, why = decide(attempt("failed", 1, progressed=True, checkpoint_step=300), [attempt("failed")], 5, 2)
    assert action == "requeue" and "step 300" in why


SRUN_LOG = """\
0: 12:00:01 step 1/50 loss 6.42
srun: error: n2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=3.0
srun: error: n1: task 0: Exited with exit code 1
srun: error: n3: tasks 4-5,7: Terminated
"""


def test_srun_task_reports_are_read_in_order():
    ends = srun_task_ends(SRUN_LOG)
    assert ends == [TaskEnd(1, "n2", "Killed"), TaskEnd(0, "n1", "Exited with exit code 1"),
                    TaskEnd(4, "n3", "Terminated"), TaskEnd(5, "n3", "Terminated"), TaskEnd(7, "n3", "Terminated")]


def error(rank: int, t: float, kind: str, message: str) -> dict:
    return {"rank": rank, "time": t, "host": f"n{rank + 1}", "type": kind, "message": message}


def test_the_first_real_failure_is_named_not_the_peers_that_followed():
    peer = error(0, 10.0, "RuntimeError", "[pair.cc:553] Connection closed by peer [127.0.0.1]:28335")
    # a killed rank leaves no record: srun names it, before the peer's connection error
    assert first_failure([peer], srun_task_ends(SRUN_LOG)) == \
        "rank 1 on n2: Killed (SIGKILL: out of memory, or killed from outside)"
    # a rank's own error beats the NCCL timeouts its peers raise later, and earlier downstream ones
    timeout = error(2, 5.0, "DistBackendError", "Watchdog caught collective operation timeout: WorkNCCL(...)")
    oom = error(3, 9.0, "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert first_failure([timeout, oom, peer], []) == "rank 3 on n4: OutOfMemoryError: CUDA out of memory. " \
                                                      "Tried to allocate 2.00 GiB"
    assert first_failure([timeout], []).startswith("rank 2 on n3: DistBackendError")  # nothing better known
    # a hung rank: silent when srun ends it, or the last to time out when srun's SIGCONT woke it first
    waiting = error(0, 20.0, "RuntimeError", "Timed out waiting 12000ms for recv operation to complete")
    assert first_failure([waiting], srun_task_ends("srun: error: n2: task 1: Killed\n")).startswith(
        "rank 1 on n2 hung: rank 0's collective timed out waiting (parallel.timeout_minutes), then srun ended it")
    woken = error(1, 33.0, "RuntimeError", "Timed out waiting 12000ms for recv operation to complete")
    assert first_failure([waiting, woken], []).startswith("rank 1 on n2 hung: rank 0's collective timed out")
    woken_to_a_closed_peer = error(1, 22.5, "RuntimeError", "[pair.cc:553] Connection closed by peer")
    assert first_failure([waiting, woken_to_a_closed_peer], []) == (
        "rank 1 on n2 hung: rank 0's collective timed out waiting (parallel.timeout_minutes), it failed only 2 s "
        "later (RuntimeError)")
    peers = [error(r, 20.0 + r / 10, "RuntimeError", "Timed out waiting 12000ms") for r in range(4)]
    assert first_failure(peers, []).startswith("rank 0 on n1: RuntimeError: Timed out")  # no one stands out
    assert first_failure([], srun_task_ends("srun: error: n1: task 0: Exited with exit code 1\n")) == \
        "rank 0 on n1: Exited with exit code 1"
    assert first_failure([], []) is None


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}),
    # torchrun's variables win; a batch script (no step) and a one-task step are single processes
    ({"RANK": "2", "WORLD_SIZE": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"},
     {"RANK": "2", "WORLD_SIZE": "4"}),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, {}),
    ({"SLURM_STEP_ID": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, {}),
])
def test_ranks_come_from_an_srun_step(env, expected):
    env = dict(env)
    adopt_launcher_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k in env} == expected


def test_an_srun_step_without_a_rendezvous_address_is_one_line():
    from megalign.errors import MegalignError

    with pytest.raises(MegalignError, match="MASTER_ADDR and MASTER_PORT are not set.*train.sbatch sets both"):
        adopt_launcher_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
