"""LongAlign's loss weighting, exact for the whole global batch at any parallel layout.

For a global batch of M sequences, sequence i with N_i target tokens and summed loss L_i:
  sequence  L = (1/M) sum_i L_i / N_i          (LongAlign Eq. 2, the default)
  token     L = sum_i L_i / sum_i N_i          (Megatron / NeMo)
  pack      L = mean over packs of each pack's token mean   (LongAlign Eq. 3, plain packing)
Each micro-batch contributes sum_t w_t * loss_t with per-token weights w (1/N_i, 1, or 1/N_pack) and a count
(sequences, target tokens, or packs); megatron sums both over micro-batches and data-parallel ranks and divides
the gradients by the global count (calculate_per_token_loss), so no layout changes the result.
"""

from __future__ import annotations

import numpy as np
import torch

from megalign.config import LOSS_MODES


def token_weights(targets: np.ndarray, lengths: np.ndarray, mode: str) -> tuple[np.ndarray, int]:
    """Per-token loss weights of one pack and its count.

    targets: [t] 1 where token t's label is a training target; lengths: per-sample lengths (sum == t).
    """
    sample_of_token = np.repeat(np.arange(len(lengths)), lengths)
    per_sample = np.bincount(sample_of_token, weights=targets, minlength=len(lengths))
    if mode == "sequence":
        inverse = np.divide(1.0, per_sample, out=np.zeros_like(per_sample), where=per_sample > 0)
        return targets * inverse[sample_of_token], int((per_sample > 0).sum())
    if mode == "token":
        return targets.astype(np.float64), int(targets.sum())
    if mode == "pack":
        total = targets.sum()
        return (targets / total if total else targets.astype(np.float64)), int(total > 0)
    raise ValueError(f"loss mode {mode!r}; valid: {', '.join(LOSS_MODES)}")


def weighted_loss(per_token_loss: torch.Tensor, weights: torch.Tensor, count: torch.Tensor):
    """megatron loss_func contract under calculate_per_token_loss: (loss sum, count, values to report)."""
    total = (per_token_loss.reshape(-1).float() * weights).sum()
    report = torch.stack([total.detach().clone(), count.detach().to(torch.float32)])  # the schedule divides in place
    return total, count, {"loss_sum_and_count": report}
