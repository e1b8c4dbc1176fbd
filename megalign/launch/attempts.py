"""One attempt of a Slurm training job (a first run or a requeue): what it did, why it ended, and whether to
requeue. The batch script (launch/slurm/train.sbatch) calls this through megalign/launch/job.py; the decisions
are plain functions, so they are tested without a cluster.

RUN_DIR/attempts.jsonl gets one line per attempt:
  job_id, restart (SLURM_RESTART_COUNT), nodes, tasks, start, end (ISO times), first_step / last_step (the steps
  it trained), checkpoint_step (newest checkpoint when it ended), exit_code (srun's), status (the run's, from
  run_status.json; "killed" when the run could not say), reason, failure (the first rank that failed and why),
  action (done | requeue | stop) and why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megalign.files import fsync_path

ATTEMPTS_FILE = "attempts.jsonl"

# srun's own report of a task that ended badly: "srun: error: n2: task 1: Killed", "... tasks 2-3: Terminated",
# "... task 0: Exited with exit code 1".
_SRUN_TASK = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$")
# Errors a rank raises because a peer failed first: never the root cause while something else is known.
_DOWNSTREAM = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|communicator was aborted|"
                         r"watchdog caught collective operation timeout|timed out|timeout|socket|"
                         r"barrier|NCCL communicator|DistBackendError|DistNetworkError", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


@dataclass
class Attempt:
    job_id: str
    restart: int
    nodes: str
    tasks: int
    start: str
    end: str
    first_step: Optional[int]
    last_step: Optional[int]
    checkpoint_step: Optional[int]
    exit_code: int
    status: str
    reason: str
    failure: Optional[str]
    progressed: bool = False  # a newer checkpoint than the attempt started from
    action: str = ""
    why: str = ""


@dataclass(frozen=True)
class TaskEnd:
    """srun's line about a task (one task is one rank here) that did not exit 0."""
    rank: int
    node: str
    what: str  # Killed | Terminated | Exited with exit code N | Segmentation fault ...

    @property
    def from_peer_cleanup(self) -> bool:
        """Ended by srun because another task failed (--kill-on-bad-exit sends SIGTERM, then SIGKILL)."""
        return self.what.startswith("Terminated")


def _expand(tasks: str) -> list[int]:
    out = []
    for part in tasks.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def srun_task_ends(log_text: str) -> list[TaskEnd]:
    """srun's reports of tasks that ended badly, in the order srun printed them (the order they ended)."""
    ends = []
    for line in log_text.splitlines():
        found = _SRUN_TASK.search(line)
        if found:
            ends.extend(TaskEnd(rank, found["node"], found["what"].strip()) for rank in _expand(found["tasks"]))
    return ends


def first_failure(rank_errors: list[dict], task_ends: list[TaskEnd]) -> Optional[str]:
    """The first real failure of an attempt, in one line.

    A rank's own error comes first, unless it is one that peers raise after a failure elsewhere (a lost
    connection, a collective timeout). Then, when a collective timed out, the rank that was waited for hung: the
    one that left no error (srun ended it), or the one that failed only after the others had timed out. Without
    a timeout, a rank that left no error and that srun reports killed was killed from outside (SIGKILL: out of
    memory, a lost node). srun's report order is not relied on: two nodes report apart."""
    own = [e for e in rank_errors if not _DOWNSTREAM.search(f"{e['type']} {e['message']}")]
    if own:
        return _describe_error(own[0])
    reported = {e["rank"] for e in rank_errors}
    silent = [t for t in task_ends if t.rank not in reported and not t.what.startswith("Exited with exit code")]
    timed_out = [e for e in rank_errors if _TIMEOUT.search(e["message"])]  # earliest first
    if timed_out:
        first = timed_out[0]
        if silent:  # never answered: srun had to end it
            rank, node, how = silent[0].rank, silent[0].node, f"then srun ended it ({silent[0].what})"
        elif late := [e for e in rank_errors if e["time"] >= first["time"] and e is not first and
                      (not _TIMEOUT.search(e["message"]) or e["time"] - first["time"] > 1.0)]:
            # it answered nothing while its peers waited (stopped until srun's SIGCONT woke it, or stuck), and
            # failed only afterwards: its own late timeout, or the peers that had gone
            late = late[0]
            rank, node = late["rank"], late["host"]
            how = f"it failed only {late['time'] - first['time']:.0f} s later ({late['type']})"
        else:
            return (f"{_describe_error(first)} (a collective timed out: a peer hung or died; with NCCL, the flight "
                    "recorder's traces say which)")
        return (f"rank {rank} on {node} hung: rank {first['rank']}'s collective timed out waiting "
                f"(parallel.timeout_minutes), {how}")
    killed = [t for t in silent if not t.from_peer_cleanup] or [t for t in task_ends if t.what == "Killed"]
    if killed:
        t = killed[0]
        hint = " (SIGKILL: out of memory, or killed from outside)" if t.what == "Killed" else ""
        return f"rank {t.rank} on {t.node}: {t.what}{hint}"
    if rank_errors:
        return _describe_error(rank_errors[0])
    exited = [t for t in task_ends if not t.from_peer_cleanup]
    if exited:
        return f"rank {exited[0].rank} on {exited[0].node}: {exited[0].what}"
    return None


def _describe_error(e: dict) -> str:
    return f"rank {e['rank']} on {e['host']}: {e['type']}: {e['message']}"


def exit_description(code: int) -> str:
    """srun's/the shell's exit code in words (128+N: ended by signal N)."""
    if code > 128 and code - 128 in signal.valid_signals():
        return f"exit {code} ({signal.Signals(code - 128).name})"
    return f"exit {code}"


def decide(attempt: Attempt, previous: list[Attempt], max_restarts: int, max_stalled: int) -> tuple[str, str]:
    """(action, why) for an attempt that just ended. `previous`: the run's earlier attempts (attempts.jsonl)."""
    if attempt.status in ("finished", "paused"):
        return "done", f"the run is {attempt.status}"
    if attempt.status == "invalid":
        return "stop", "bad config or input: retrying cannot help (fix it and resubmit)"
    if attempt.status != "stopped" and not attempt.progressed:
        stalled = 1
        for before in reversed(previous):
            if before.progressed or before.status in ("stopped", "finished", "paused"):
                break
            stalled += 1
        if stalled >= max_stalled:
            return "stop", (f"{stalled} attempt{'s' if stalled > 1 else ''} in a row failed without a new checkpoint (MEGALIGN_MAX_STALLED="
                            f"{max_stalled}): not requeued; fix the cause, then resubmit to resume")
    if attempt.restart >= max_restarts:
        return "stop", (f"restarted {attempt.restart} times (MEGALIGN_MAX_RESTARTS={max_restarts}): not requeued; "
                        "resubmit the same command to resume")
    if attempt.status == "stopped":
        return "requeue", "stopped by a signal after a checkpoint: requeued, it resumes from that checkpoint"
    if attempt.progressed:
        return "requeue", f"failed after a new checkpoint (step {attempt.checkpoint_step}): requeued"
    return "requeue", "failed without a new checkpoint: requeued once more"


def read_attempts(run_dir: str | Path) -> list[Attempt]:
    path = Path(run_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    attempts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                attempts.append(Attempt(**json.loads(line)))
            except (ValueError, TypeError):
                continue  # a line from a different version, or one cut short by a crash: not ours to judge
    return attempts


def append_attempt(run_dir: str | Path, attempt: Attempt) -> Path:
    """Append one line (one write, then fsync: a reader never sees half of it unless the disk lies)."""
    path = Path(run_dir) / ATTEMPTS_FILE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(attempt)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_path(path.parent)
    return path


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
