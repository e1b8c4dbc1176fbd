"""Per-step metrics: metrics.jsonl (always), TensorBoard and wandb (offline, or off without a key)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megalign.config import Config


class MetricsLogger:
    """Writes on the logging rank only; other ranks get a logger that does nothing."""

    def __init__(self, cfg: Config, enabled: bool):
        self.enabled = enabled
        self.dir = Path(cfg.run.output_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if cfg.run.wandb != "off":
            mode = cfg.run.wandb
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                mode = "offline"  # no key: keep the run locally, `wandb sync` later
            import wandb

            from megalign.config import to_dict

            self._wandb = wandb.init(project=cfg.run.wandb_project, dir=str(self.dir), mode=mode,
                                     config=to_dict(cfg))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
