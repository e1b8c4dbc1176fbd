"""The bookkeeping of launch/slurm/train.sbatch, one call before the ranks start and one after they end:

  python -m megalign.launch.job begin --config FILE.yaml [key=value ...]
      checks the config against this allocation (SLURM_NTASKS ranks; data and output paths), then prints the
      attempt's settings as shell `export` lines: MEGALIGN_RUN_DIR, MEGALIGN_ATTEMPT_LOG, ...
  python -m megalign.launch.job end --exit-code RC
      (with those variables set) records the attempt in RUN_DIR/attempts.jsonl, names the first failure, and
      prints MEGALIGN_ACTION=done|requeue|stop and MEGALIGN_EXIT=N for the script.

What it says for people goes to stderr, which is the job's log.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from megalign.cli import Parser
from megalign.launch.attempts import (Attempt, append_attempt, decide, exit_description, first_failure, iso,
                                      read_attempts, srun_task_ends)

DEFAULT_MAX_RESTARTS = 20
DEFAULT_MAX_STALLED = 2


def say(message: str) -> None:
    print(f"megalign: {message}", file=sys.stderr, flush=True)


def begin(config: str | None, overrides: list[str], env=os.environ) -> dict[str, str]:
    """Validate the run for this allocation and name this attempt; the settings `end` needs."""
    from megalign.checkpoint.store import CheckpointStore, step_of
    from megalign.config import checkpoint_dir, load_config, validate

    cfg = load_config(config, overrides)
    tasks = int(env.get("SLURM_NTASKS", "1"))
    validate(cfg, tasks)
    run_dir = Path(cfg.run.output_dir).resolve()
    job_id, restart = env.get("SLURM_JOB_ID", "local"), int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    newest = CheckpointStore(checkpoint_dir(cfg)).latest()
    settings = {
        "MEGALIGN_RUN_DIR": str(run_dir),
        "MEGALIGN_CHECKPOINT_DIR": str(checkpoint_dir(cfg).resolve()),
        "MEGALIGN_ATTEMPT_LOG": str(run_dir / "logs" / f"train-{job_id}-r{restart}.log"),
        "MEGALIGN_ATTEMPT_START": f"{time.time():.3f}",
        "MEGALIGN_START_CHECKPOINT": str(step_of(newest)) if newest else "",
        "MEGALIGN_RESTART": str(restart),
    }
    where = f"resuming from {newest}" if newest else "no checkpoint yet: starting"
    say(f"job {job_id} attempt {restart + 1} (restart {restart}) on {env.get('SLURM_JOB_NODELIST', '?')}, "
        f"{tasks} ranks; {where}; log: {settings['MEGALIGN_ATTEMPT_LOG']}")
    return settings


def end(exit_code: int, env=os.environ) -> tuple[str, int]:
    """Record the attempt that just ended and decide what the batch script does: (action, exit status)."""
    from megalign.checkpoint.store import CheckpointStore, step_of
    from megalign.training.status import STATUS_FILE, read_rank_errors, read_status

    run_dir, started = Path(env["MEGALIGN_RUN_DIR"]), float(env["MEGALIGN_ATTEMPT_START"])
    start_checkpoint = int(env["MEGALIGN_START_CHECKPOINT"]) if env.get("MEGALIGN_START_CHECKPOINT") else None
    newest = CheckpointStore(env["MEGALIGN_CHECKPOINT_DIR"]).latest()
    checkpoint_step = step_of(newest) if newest else None

    status_path = run_dir / STATUS_FILE
    fresh = status_path.is_file() and status_path.stat().st_mtime >= started
    record = read_status(run_dir) if fresh else None
    if record and record["status"] != "running":
        status, reason, exit_status = record["status"], record.get("reason", ""), record["exit_code"]
        last_step = record.get("step")
    else:  # the ranks were killed (or died) before they could say how the run ended
        status, reason = "killed", f"the ranks ended without a status ({exit_description(exit_code)})"
        exit_status, last_step = exit_code or 1, _last_logged_step(run_dir, started)
    first_step = record["started_step"] + 1 if record and record.get("started_step") is not None else None

    failure = None
    if status not in ("finished", "paused", "stopped"):
        log_path = Path(env["MEGALIGN_ATTEMPT_LOG"])
        log_text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
        failure = first_failure(read_rank_errors(run_dir, since=started), srun_task_ends(log_text))
    attempt = Attempt(
        job_id=env.get("SLURM_JOB_ID", "local"), restart=int(env.get("MEGALIGN_RESTART", "0")),
        nodes=env.get("SLURM_JOB_NODELIST", ""), tasks=int(env.get("SLURM_NTASKS", "1")), start=iso(started),
        end=iso(time.time()), first_step=first_step, last_step=last_step, checkpoint_step=checkpoint_step,
        exit_code=exit_code, status=status, reason=reason, failure=failure,
        progressed=checkpoint_step is not None and checkpoint_step != start_checkpoint,
    )
    attempt.action, attempt.why = decide(
        attempt, read_attempts(run_dir), max_restarts=int(env.get("MEGALIGN_MAX_RESTARTS", DEFAULT_MAX_RESTARTS)),
        max_stalled=int(env.get("MEGALIGN_MAX_STALLED", DEFAULT_MAX_STALLED)))
    append_attempt(run_dir, attempt)

    steps = f"steps {first_step}-{last_step}" if first_step and last_step and last_step >= first_step else "no step"
    saved = f"newest checkpoint: step {checkpoint_step}" if checkpoint_step is not None else "no checkpoint"
    brief = reason if len(reason) <= 160 else reason[:157] + "..."
    say(f"attempt {attempt.restart + 1} of job {attempt.job_id} ended {status} ({brief}); {steps}; {saved}; "
        f"srun {exit_description(exit_code)}")
    if failure:
        say(f"first failure: {failure} (tracebacks: {env['MEGALIGN_ATTEMPT_LOG']}, {run_dir / 'errors'})")
    say(f"{attempt.action}: {attempt.why}")
    return attempt.action, 0 if attempt.action in ("done", "requeue") else (exit_status or 1)


def _last_logged_step(run_dir: Path, since: float) -> int | None:
    """The last step in metrics.jsonl, if this attempt wrote it (the run could not report its own end)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_mtime < since:
        return None
    lines = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else None
    except (ValueError, KeyError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m megalign.launch.job", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("begin", help="check the config for this allocation; print the attempt's settings")
    b.add_argument("--config")
    b.add_argument("overrides", nargs="*")
    e = sub.add_parser("end", help="record the attempt; print MEGALIGN_ACTION and MEGALIGN_EXIT")
    e.add_argument("--exit-code", type=int, required=True, help="srun's exit status")
    args = parser.parse_args(argv)
    if args.command == "begin":
        settings = parser.call(begin, args.config, args.overrides)
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in settings.items()))
    else:
        action, status = parser.call(end, args.exit_code)
        print(f"MEGALIGN_ACTION={action} MEGALIGN_EXIT={status}")


if __name__ == "__main__":
    main()
