"""Entry point: `torchrun --nproc_per_node N -m megalign.train --config FILE.yaml [key=value ...]`.

Its exit status says how the run ended (training/status.py): 0 finished or paused at run.stop_at_step, 75 stopped
by a signal after a checkpoint (rerun to resume), 1 failed, 2 bad config or input; run.output_dir/run_status.json
says the same.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from megalign.cli import Parser
from megalign.config import load_config, to_dict, validate
from megalign.errors import MegalignError
from megalign.training.status import RunStatus, write_rank_error, write_status


def _setup_logging(output_dir: Path, is_logging_rank: bool) -> logging.Logger:
    log = logging.getLogger("megalign")
    log.setLevel(logging.INFO if is_logging_rank else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if is_logging_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(output_dir / "train.log")
        file.setFormatter(fmt)
        log.addHandler(file)
    return log


def run(config_path: str | None, overrides: list[str]) -> RunStatus:
    """Train as the config says; returns how the run ended. A MegalignError before the trainer exists (bad config)
    leaves nothing behind; after it, run_status.json records it, and every rank that raises leaves its error in
    run.output_dir/errors/ (for the launcher to name the first one)."""
    from megalign.checkpoint.preemption import PreemptionWatch
    from megalign.parallel.launcher import world_size_from_env

    with PreemptionWatch() as watch:  # from the start: a time-limit signal during start-up stops after step one
        cfg = load_config(config_path, overrides)
        validate(cfg, world_size_from_env())  # before any process group starts, and before the slow imports
        from megalign import megatron_compat

        megatron_compat.quiet_known_warnings()
        return _train(cfg, watch)


def _train(cfg, watch) -> RunStatus:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from megalign.parallel.setup import shutdown
    from megalign.training.loop import train
    from megalign.training.trainer import Trainer

    out = Path(cfg.run.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    speaker = rank == 0  # the rank that logs and writes the run's files
    trainer = None
    attempt = {}  # what every status record of this run repeats
    try:
        trainer = Trainer(cfg)
        log = _setup_logging(out, speaker)
        attempt = {"started_step": trainer.step, "steps": cfg.training.steps,
                   "checkpoint_dir": str(trainer.checkpoints.root), "world_size": trainer.layout.world_size}
        if speaker:
            OmegaConf.save(OmegaConf.create(to_dict(trainer.cfg)), out / "config.yaml")
            write_status(out, RunStatus.RUNNING, step=trainer.step, **attempt)
        end = train(trainer, log, watch)
        if speaker:
            newest = trainer.checkpoints.latest()
            write_status(out, end.status, reason=end.reason, step=end.step,
                         checkpoint=str(newest) if newest else None, **attempt)
        return end.status
    except BaseException as e:
        invalid = isinstance(e, MegalignError) and not e.retryable
        write_rank_error(out, rank, e)
        if speaker:
            status = RunStatus.INVALID if invalid else RunStatus.FAILED
            first_line = (str(e).splitlines() or [""])[0]
            write_status(out, status, reason=f"{type(e).__name__}: {first_line}"[:500],
                         step=trainer.step if trainer else None, **attempt)
        raise
    finally:
        if trainer is not None and dist.is_initialized() and sys.exc_info()[0] is None:
            dist.barrier()
        shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m megalign.train", description=__doc__)
    parser.add_argument("--config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.lr=1e-5 parallel.tp=2")
    args = parser.parse_args(argv)
    status = parser.call(run, args.config, args.overrides)
    sys.exit(status.exit_code)


if __name__ == "__main__":
    main()
