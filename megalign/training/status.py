"""How a run ended, for whoever launched it: an exit status, and the same in `run.output_dir/run_status.json`.

  status     exit  meaning                                                            what a launcher does
  finished   0     training.steps reached, final checkpoint saved                     next job in the chain
  paused     0     run.stop_at_step reached as asked, checkpoint saved                next job (it resumes)
  stopped    75    SIGTERM/SIGUSR1 (time limit, preemption): the step finished, a     requeue: the same command
                   checkpoint saved; resumable                                        resumes
  failed     1     an error (its traceback is in the log)                             stop, or retry if progress
  invalid    2     bad config or input: a one-line error, before or during the run    stop: retrying cannot help

A rank that raises also leaves `run.output_dir/errors/rank-NNNNN.json` (time, host, the exception and the end of
its traceback), so a launcher can name the first rank that failed rather than the peers that failed after it.

75 is sysexits' EX_TEMPFAIL ("try again later"). The file is written atomically by rank 0: "running" when the run
starts, then its end. A file still saying "running" after the processes are gone means they were killed (SIGKILL,
out of memory, a node lost) before they could write it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from enum import Enum
from pathlib import Path

from megalign.files import write_atomically

STATUS_FILE = "run_status.json"
ERRORS_DIR = "errors"


class RunStatus(str, Enum):
    RUNNING = "running"
    FINISHED = "finished"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"
    INVALID = "invalid"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]


EXIT_CODES = {RunStatus.RUNNING: 0, RunStatus.FINISHED: 0, RunStatus.PAUSED: 0, RunStatus.STOPPED: 75,
              RunStatus.FAILED: 1, RunStatus.INVALID: 2}


def write_status(output_dir: str | Path, status: RunStatus, **details) -> Path:
    """Replace output_dir/run_status.json with {"status", "exit_code", "time", **details} (atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"status": status.value, "exit_code": status.exit_code, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **details}
    write_atomically(out / STATUS_FILE, json.dumps(record, indent=1) + "\n")
    return out / STATUS_FILE


def read_status(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / STATUS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_rank_error(output_dir: str | Path, rank: int, error: BaseException) -> Path | None:
    """Record why this rank is failing (best effort: a full disk must not hide the error being recorded)."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    record = {"rank": rank, "time": time.time(), "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
              "pid": os.getpid(), "type": type(error).__name__,
              "message": (str(error).splitlines() or [""])[0][:500], "traceback": "".join(lines)[-4000:]}
    path = Path(output_dir) / ERRORS_DIR / f"rank-{rank:05d}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record, indent=1) + "\n")
    except OSError:
        return None
    return path


def read_rank_errors(output_dir: str | Path, since: float = 0.0) -> list[dict]:
    """The error records written at or after `since` (seconds since the epoch), earliest first."""
    found = []
    for path in sorted((Path(output_dir) / ERRORS_DIR).glob("rank-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("time", 0) >= since:
            found.append(record)
    return sorted(found, key=lambda r: r["time"])
