"""Objectives: what a micro-batch carries for the loss, how its loss is computed, and how the reports of a step are
reduced to the figures it logs. The loop and the schedules never look inside.

An objective has three parts, each called at one place:

  loss_inputs(targets, lengths)   host side, when the micro-batch is built (training/batch.py): per-token tensors
                                  (cut with the tokens under context parallelism) and the micro-batch's count
  loss(per_token_loss, batch)     in megatron's schedule: megatron's loss_func contract under
                                  calculate_per_token_loss, (loss sum, count, reports); megatron sums counts over
                                  micro-batches and DP x CP ranks and divides the gradients by the total
  sums(reports) / metrics(sums)   after the schedule: this rank's sums of the reports (a float64 vector that the
                                  trainer all-reduces), and the global figures from them ({"loss": ...})

`sft` is LongAlign's per-token-weighted cross-entropy (training/loss.py). Objectives whose loss is not linear in
per-token terms (preference optimization: a function of per-response log-probability sums) fit the same contract:
their loss_inputs mark the responses, their loss reduces each response first (training/preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from megalign.config import LOSS_MODES, OBJECTIVES, PREFERENCE_OBJECTIVES, TrainingConfig
from megalign.errors import MegalignError
from megalign.training.loss import token_weights, weighted_loss


@dataclass(frozen=True)
class LossInputs:
    """What a micro-batch carries for its objective: tensors with one value per token (cut with the tokens under
    context parallelism), its count, and tensors of the whole row that are not per token (the preference
    objectives' per-response and per-group tables, the same on every CP rank)."""

    per_token: dict[str, torch.Tensor]
    count: torch.Tensor
    groups: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SFT:
    """Cross-entropy on the answer tokens, weighted as `weighting` says (sequence, token or pack; see loss.py)."""

    weighting: str = "sequence"
    name: ClassVar[str] = "sft"

    def __post_init__(self):
        if self.weighting not in LOSS_MODES:
            raise MegalignError(f"config key training.loss: {self.weighting!r} is not one of {', '.join(LOSS_MODES)}")

    def loss_inputs(self, targets: np.ndarray, lengths: np.ndarray) -> LossInputs:
        weights, count = token_weights(targets, lengths, self.weighting)
        return LossInputs({"weight": torch.from_numpy(weights.astype(np.float32))},
                          torch.tensor(count, dtype=torch.int))

    def loss(self, per_token_loss: torch.Tensor, inputs: LossInputs):
        return weighted_loss(per_token_loss, inputs.per_token["weight"], inputs.count)

    def sums(self, reports: list[dict]) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64)
        for r in reports:
            total += r["loss_sum_and_count"].double().cpu()
        return total

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss_sum, count = sums.tolist()
        return {"loss": loss_sum / max(count, 1.0)}


def make_objective(t: TrainingConfig):
    """The objective training.objective names, with its keys."""
    if t.objective == "sft":
        return SFT(t.loss)
    if t.objective in PREFERENCE_OBJECTIVES:
        from megalign.training.preference import make_preference

        return make_preference(t)
    raise MegalignError(f"config key training.objective: {t.objective!r} is not one of {', '.join(OBJECTIVES)}")
