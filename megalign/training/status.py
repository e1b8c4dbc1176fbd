"""How a run ended, for whoever launched it: an exit status, and the same in `run.output_dir/run_status.json`.

  status     exit  meaning                                                            what a launcher does
  finished   0     training.steps reached, final checkpoint saved                     next job in the chain
  paused     0     run.stop_at_step reached as asked, checkpoint saved                next job (it resumes)
  stopped    75    SIGTERM/SIGUSR1 (time limit, preemption): the step finished, a     requeue: the same command
                   checkpoint saved; resumable                                        resumes
  failed     1     an error (its traceback is in the log)                             stop, or retry if progress
  invalid    2     bad config or input: a one-line error, before or during the run    stop: retrying cannot help

75 is sysexits' EX_TEMPFAIL ("try again later"). The file is written atomically by rank 0: "running" when the run
starts, then its end. A file still saying "running" after the processes are gone means they were killed (SIGKILL,
out of memory, a node lost) before they could write it.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path

from megalign.files import write_atomically

STATUS_FILE = "run_status.json"


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
