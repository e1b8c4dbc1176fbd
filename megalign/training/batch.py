"""A pack as a THD micro-batch: samples concatenated, never attending across a boundary.

  tokens[t]        the pack's token ids
  labels[t]        the next token inside the same sample (a sample's last token has no target)
  loss_weight[t]   the LongAlign weight of token t's target (0 where it is not a target; see loss.py)
  position_ids[t]  0, 1, ... restarting at every sample, or the positions given (SkipAlign: data/positions.py)
  cu_seqlens[n+1]  sample boundaries; max_seqlen is the longest SINGLE sample (megatron's THD RoPE switches to
                   global positions when it equals the packed length)

Under context parallelism (`context_parallel_share`) a rank holds its chunks of every sample (see
parallel/context.py): tokens, labels and loss weights are its share; cu_seqlens stay those of the whole row,
with cu_seqlens_padded for the padded row, and position_ids cover the whole padded row (megatron cuts RoPE's
angles per rank itself). The count goes to CP rank 0 only: megatron sums counts over the CP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megalign.data.packed_dataset import Pack
from megalign.data.positions import contiguous_positions
from megalign.parallel import context
from megalign.training.loss import token_weights


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_weight: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    count: torch.Tensor  # sequences / target tokens / packs, by loss mode
    num_targets: int
    cu_seqlens_padded: torch.Tensor | None = None  # context parallelism: samples padded to a multiple of 2*cp

    def packed_seq_params(self) -> PackedSeqParams:
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def to(self, device) -> "Batch":
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.loss_weight), move(self.position_ids),
                     move(self.cu_seqlens), self.max_seqlen, move(self.count), self.num_targets,
                     move(self.cu_seqlens_padded))


def thd_batch(pack: Pack, loss_mode: str, positions: np.ndarray | None = None) -> Batch:
    """`positions`: the pack's position ids ([t], e.g. data/positions.py's SkipAlign ones); None: 0, 1, ... per
    sample."""
    lengths = np.asarray(pack.lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = pack.tokens.astype(np.int64)
    last = starts + lengths - 1  # a sample's last token predicts nothing inside the sample
    labels = np.roll(tokens, -1)
    labels[last] = 0
    targets = np.roll(pack.loss_mask.astype(np.float64), -1)
    targets[last] = 0.0
    weights, count = token_weights(targets, lengths, loss_mode)
    if positions is None:
        positions = contiguous_positions(lengths)
    elif np.shape(positions) != tokens.shape:
        raise ValueError(f"{np.shape(positions)} positions for a pack of {len(tokens)} tokens")
    else:
        positions = np.asarray(positions, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return Batch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_weight=torch.from_numpy(weights.astype(np.float32)),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lengths.max()),
        count=torch.tensor(count, dtype=torch.int),
        num_targets=int(targets.sum()),
    )


def context_parallel_share(batch: Batch, cp: int, rank: int) -> Batch:
    """Rank `rank`'s share of a whole-row batch under context parallelism of size `cp` (weights and counts come
    from the whole row, so the global loss is the CP=1 loss)."""
    lengths = np.diff(batch.cu_seqlens.numpy()).astype(np.int64)
    padded = context.padded_lengths(lengths, cp)
    source = context.padding_index(lengths, cp)
    real = source >= 0
    from_row = np.maximum(source, 0)
    mine = context.rank_index(padded, cp, rank)

    def share(x: torch.Tensor) -> torch.Tensor:
        row = np.where(real, x.numpy()[from_row], np.zeros((), dtype=x.numpy().dtype))
        return torch.from_numpy(row[mine])

    # padding continues each sample's positions (never seen by a real token: it comes after them)
    positions = batch.position_ids.numpy()
    offset = contiguous_positions(padded)  # each padded position's offset in its sample
    last_real = np.repeat(np.cumsum(lengths) - 1, padded)
    padded_positions = np.where(real, positions[from_row], positions[last_real] + offset - np.repeat(lengths, padded) + 1)
    return Batch(
        tokens=share(batch.tokens),
        labels=share(batch.labels),
        loss_weight=share(batch.loss_weight),
        position_ids=torch.from_numpy(padded_positions),
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=int(padded.max()),
        count=batch.count if rank == 0 else torch.zeros_like(batch.count),
        num_targets=batch.num_targets,
        cu_seqlens_padded=torch.from_numpy(np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)),
    )
