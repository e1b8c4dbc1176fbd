"""Per-step metrics: metrics.jsonl (always), console, TensorBoard and wandb (offline, or off without a key).

Model FLOPs count attention per sequence (causal, over each sample's own length), never over the whole pack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megalign.config import Config, ModelConfig


def dense_flops_per_token(m: ModelConfig, padded_vocab: int) -> float:
    """Forward FLOPs of the matrix multiplies per token (2 x multiply-adds): QKV, output, MLP, logits."""
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    qkv = m.hidden_size * head_dim * (m.num_attention_heads + 2 * groups)
    proj = m.num_attention_heads * head_dim * m.hidden_size
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    return 2.0 * (m.num_layers * (qkv + proj + mlp) + m.hidden_size * padded_vocab)


def attention_flops(m: ModelConfig, sequence_lengths) -> float:
    """Forward FLOPs of QK^T and AV for causal attention, summed over sequences: 2 * 2 * n^2/2 * heads * dim."""
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    width = m.num_attention_heads * head_dim
    return m.num_layers * sum(2.0 * n * n * width for n in sequence_lengths)


def step_flops(m: ModelConfig, padded_vocab: int, sequence_lengths) -> float:
    """Training FLOPs of one step (forward + backward = 3 x forward), recomputation not counted."""
    tokens = sum(sequence_lengths)
    return 3.0 * (tokens * dense_flops_per_token(m, padded_vocab) + attention_flops(m, sequence_lengths))


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
