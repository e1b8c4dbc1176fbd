"""Validation loss while training: every pack of the held-out datasets (data.valid_path), forward only, with the
run's objective and contiguous positions, every training.eval_interval steps.

Besides the overall loss it reports the loss of the samples in each length bucket (training.eval_buckets: edges in
tokens, e.g. <8k, 8k-32k, >=32k). A bucket's loss is the run's weighting restricted to its samples (`sequence`:
the mean of their per-sample means; `token`: their token mean; `pack`, which weighs whole packs, falls back to the
token mean inside a bucket). Like the training loss, every figure is a sum over micro-batches and ranks divided
once, so it does not depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Sequence

import numpy as np
import torch

from megalign.data.sampler import PackRef
from megalign.training.loss import token_weights
from megalign.training.objective import SFT, LossInputs


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """[8192, 32768] -> ["<8k", "8k-32k", ">=32k"]."""
    def size(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 else str(n)

    bounds = [size(e) for e in edges]
    if not bounds:
        return ["all"]
    return [f"<{bounds[0]}"] + [f"{a}-{b}" for a, b in zip(bounds, bounds[1:])] + [f">={bounds[-1]}"]


@dataclass(frozen=True)
class BucketedSFT:
    """`base`'s loss, and the same loss over the samples of each length bucket (reports only: no gradients)."""

    base: SFT
    edges: tuple[int, ...]
    name: ClassVar[str] = "sft"

    def loss_inputs(self, targets: np.ndarray, lengths: np.ndarray) -> LossInputs:
        inputs = self.base.loss_inputs(targets, lengths)
        bucket_of_token = np.repeat(np.searchsorted(np.asarray(self.edges), lengths, side="right"), lengths)
        mode = "token" if self.base.weighting == "pack" else self.base.weighting
        per_token, counts = dict(inputs.per_token), [int(inputs.count)]
        for b in range(len(self.edges) + 1):
            weights, count = token_weights(targets * (bucket_of_token == b), lengths, mode)
            per_token[f"bucket{b}"] = torch.from_numpy(weights.astype(np.float32))
            counts.append(count)
        # one count tensor (the run's, then each bucket's): the CP cut keeps all of them on CP rank 0 only
        return LossInputs(per_token, torch.tensor(counts, dtype=torch.int))

    def loss(self, per_token_loss: torch.Tensor, inputs: LossInputs):
        total, count, report = self.base.loss(per_token_loss, LossInputs(inputs.per_token, inputs.count[0]))
        flat = per_token_loss.reshape(-1).float().detach()
        for b in range(len(self.edges) + 1):
            bucket_sum = (flat * inputs.per_token[f"bucket{b}"]).sum()
            report[f"bucket{b}"] = torch.stack([bucket_sum, inputs.count[b + 1].to(torch.float32)])
        return total, count, report

    def sums(self, reports: list[dict]) -> torch.Tensor:
        parts = [self.base.sums(reports)]
        for b in range(len(self.edges) + 1):
            part = torch.zeros(2, dtype=torch.float64)
            for r in reports:
                part += r[f"bucket{b}"].double().cpu()
            parts.append(part)
        return torch.cat(parts)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        figures = self.base.metrics(sums[:2])
        for label, (loss_sum, count) in zip(bucket_labels(self.edges), sums[2:].view(-1, 2).tolist()):
            if count > 0:
                figures[f"loss/{label}"] = loss_sum / count
        return figures


class Validator:
    """The validation loss of `trainer`'s model on `datasets`: every pack once, each DP rank a share."""

    def __init__(self, trainer, datasets: Sequence, edges: Sequence[int], objective: SFT | None = None):
        self.trainer = trainer
        self.refs = [PackRef(d, p) for d, ds in enumerate(datasets) for p in range(len(ds))]
        data = replace(trainer.cfg.data, positions="contiguous")  # no synthesized skips in held-out data
        objective = objective or trainer.objective
        if not getattr(objective, "preference", False):  # preference objectives report per group, not per length
            objective = BucketedSFT(objective, tuple(edges))
        self.batches = trainer.batches.replace(datasets=list(datasets), data=data, objective=objective)

    def run(self) -> dict[str, float]:
        """{"loss": ..., "loss/<8k": ..., "sequences": ..., "tokens": ...} over every pack (collective)."""
        t, layout = self.trainer, self.trainer.layout
        mine = self.refs[layout.dp_rank::layout.dp]  # uneven shares are fine: nothing is averaged per rank
        chunk = max(1, t.cfg.training.global_batch // layout.dp)
        rounds = -(-len(self.refs[0::layout.dp]) // chunk)  # rank 0 has the largest share: every rank joins
        total = None
        for i in range(rounds):
            sums = t.forward_sums(mine[i * chunk:(i + 1) * chunk], forward_only=True, batches=self.batches)
            total = sums if total is None else total + sums
        figures = self.batches.objective.metrics(total)
        lengths = self.batches.sequence_lengths(self.refs)
        return {**figures, "sequences": len(lengths), "tokens": int(sum(lengths))}


def validator_for(trainer) -> Validator | None:
    """The run's validator (data.valid_path, training.eval_buckets), or None without training.eval_interval."""
    cfg = trainer.cfg
    if not cfg.training.eval_interval or not cfg.valid_paths:
        return None
    from megalign.data.packed_dataset import PackedDataset

    datasets = [PackedDataset(p, verify=cfg.data.verify) for p in cfg.valid_paths]
    return Validator(trainer, datasets, cfg.training.eval_buckets)
