"""Per-step metrics: metrics.jsonl (always), TensorBoard and wandb (offline, or off without a key)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megalign.config import Config


class MetricsLogger:
    """Writes on the logging rank only; other ranks get a logger that does nothing."""

    def __init__(self, cfg: Config, enabled: bool, resumed_at: int | None = None):
        """resumed_at: the step a resumed run continues after. Records of later steps (logged by the run before
        it was killed, after its last checkpoint) are dropped, so each step appears once."""
        self.enabled = enabled
        self.dir = Path(cfg.run.output_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resumed_at is not None and path.exists():
            _keep_steps_up_to(path, resumed_at)
        self._jsonl = open(path, "a", encoding="utf-8")
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), **purge)
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
        figures = {_tag(k): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for tag, value in figures.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(figures, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard/wandb tag: valid_loss/<8k -> valid/loss/<8k, loss -> train/loss."""
    return f"valid/{key[len('valid_'):]}" if key.startswith("valid_") else f"train/{key}"


def _keep_steps_up_to(path: Path, step: int) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
