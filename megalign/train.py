"""Entry point: `torchrun --nproc_per_node N -m megalign.train --config FILE.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from megalign.config import load_config, to_dict, validate
from megalign.errors import MegalignError


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


def _quiet_known_warnings() -> None:
    """Notices from megatron-core about optional packages we chose not to need, and deprecations inside it."""
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "full scope is deprecated", "The .grad attribute of a Tensor that is not a leaf",
                    ".*is deprecated. Please use", "When using async grad allreduce"):
        warnings.filterwarnings("ignore", message=message)


def run(config_path: str | None, overrides: list[str]) -> None:
    _quiet_known_warnings()
    from megalign.parallel.setup import world_size_from_env

    cfg = load_config(config_path, overrides)
    validate(cfg, world_size_from_env())  # before any process group starts

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from megalign.parallel.setup import shutdown
    from megalign.training.loop import train
    from megalign.training.trainer import Trainer

    trainer = Trainer(cfg)
    out = Path(cfg.run.output_dir)
    log = _setup_logging(out, trainer.layout.rank == 0)
    if trainer.layout.rank == 0:
        OmegaConf.save(OmegaConf.create(to_dict(cfg)), out / "config.yaml")
    try:
        train(trainer, log)
    finally:
        if dist.is_initialized():
            dist.barrier()
        shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megalign.train", description=__doc__)
    parser.add_argument("--config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.lr=1e-5 parallel.tp=2")
    args = parser.parse_args(argv)
    try:
        run(args.config, args.overrides)
    except MegalignError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
