"""Context parallelism for packed rows: how a row is cut over the CP ranks and put back together.

Every sample is padded to a multiple of 2*cp and cut into 2*cp equal chunks; rank r keeps chunks r and
2*cp-1-r of every sample (an early and a late chunk: under causal attention each rank then does the same
work). Rank r's tokens are its chunks in sample order:

    sample s (padded length P_s, chunk c_s = P_s / 2cp):  [r*c_s, (r+1)*c_s) then [(2cp-1-r)*c_s, (2cp-r)*c_s)

This is megatron's (and TransformerEngine's) THD layout: `cu_seqlens_padded` describes the padded row, and
megatron's RoPE cuts its per-token angles the same way. Padding sits at the end of each sample, so under
causal attention no real token ever sees it; padded positions carry no loss weight.

The same plan (explicit key sets per segment) expresses shared preference prompts, with or without CP: a
response's segment reads its prompt's real keys first, then its own causally (`contexts` in attention_segments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def sample_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every sample is padded to a multiple of: 2*cp (its 2*cp chunks), and with sequence parallelism
    also tp*cp, so that each rank's share (padded/cp per sample) splits over the TP ranks: lcm(2cp, tp*cp), as
    Megatron-Bridge pads."""
    return math.lcm(2 * cp, tp * cp) if sequence_parallel else 2 * cp


def padded_lengths(lengths: np.ndarray, cp: int, multiple: int | None = None) -> np.ndarray:
    multiple = multiple or 2 * cp
    if multiple % (2 * cp):
        raise ValueError(f"samples padded to a multiple of {multiple} do not cut into {2 * cp} chunks")
    return (np.asarray(lengths, dtype=np.int64) + multiple - 1) // multiple * multiple


def padding_index(lengths: np.ndarray, cp: int, multiple: int | None = None) -> np.ndarray:
    """For each position of the padded row, the position in the unpadded row it copies, or -1 for padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = padded_lengths(lengths, cp, multiple)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offset_in_sample = np.arange(padded.sum()) - np.repeat(np.cumsum(padded) - padded, padded)
    source = np.repeat(starts, padded) + offset_in_sample
    return np.where(offset_in_sample < np.repeat(lengths, padded), source, -1)


def rank_index(padded: np.ndarray, cp: int, rank: int) -> np.ndarray:
    """The positions of the padded row that rank `rank` keeps, in its order (chunks r and 2cp-1-r per sample)."""
    padded = np.asarray(padded, dtype=np.int64)
    chunk = padded // (2 * cp)
    starts = np.cumsum(padded) - padded
    pieces = []
    for start, c in zip(starts.tolist(), chunk.tolist()):
        pieces.append(np.arange(start + rank * c, start + (rank + 1) * c))
        pieces.append(np.arange(start + (2 * cp - 1 - rank) * c, start + (2 * cp - rank) * c))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def global_order(padded: np.ndarray, cp: int) -> np.ndarray:
    """Index into the concatenation of all ranks' tokens (rank 0's, then rank 1's, ...) that gives the padded
    row in its natural order: the inverse of the ranks' cuts."""
    owned = np.concatenate([rank_index(padded, cp, r) for r in range(cp)])
    order = np.empty_like(owned)
    order[owned] = np.arange(len(owned))
    return order


class _AllGather(torch.autograd.Function):
    """Concatenate a tensor from every rank of `group` along dim 0; the gradient goes back to its owner summed
    over ranks (each rank's attention used every rank's keys and values)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].clone(), None


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(x, group)


def attention_segments(padded: np.ndarray, cp: int, rank: int, contexts: np.ndarray | None = None,
                       lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What rank `rank`'s queries attend to, as varlen segments with bottom-right causal alignment.

    Each of the rank's chunks is one segment: its c queries (consecutive in the rank's tokens) against the keys
    of its sample from the sample's start to the chunk's end (positions in the padded row). At cp=1 a sample is
    one chunk. `contexts[s]` >= 0 (a shared prompt, training/preference.py): sample s also reads every real key
    of sample contexts[s] (its `lengths`, without padding), placed before its own keys, so that bottom-right
    causality lets all of its queries see them. Returns (cu_q, cu_k, key_index): segment boundaries in the
    rank's queries and in the gathered keys, and the positions of the padded row to gather as keys, segment
    after segment.
    """
    padded = np.asarray(padded, dtype=np.int64)
    chunk = padded // (2 * cp) if cp > 1 else padded
    own = (rank, 2 * cp - 1 - rank) if cp > 1 else (0,)
    starts = np.cumsum(padded) - padded
    empty = np.zeros(0, dtype=np.int64)
    q_sizes, k_sizes, keys = [], [], []
    for s, (start, c) in enumerate(zip(starts.tolist(), chunk.tolist())):
        context = empty
        if contexts is not None and contexts[s] >= 0:
            context = np.arange(starts[contexts[s]], starts[contexts[s]] + lengths[contexts[s]])
        for j in own:
            q_sizes.append(c)
            k_sizes.append(len(context) + (j + 1) * c)
            keys.append(np.concatenate([context, np.arange(start, start + (j + 1) * c)]))
    cu_q = np.concatenate([[0], np.cumsum(q_sizes)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(k_sizes)]).astype(np.int32)
    return cu_q, cu_k, (np.concatenate(keys) if keys else empty)


@dataclass(frozen=True)
class AttentionPlan:
    """What rank r's attention needs for one micro-batch, the same for every layer: `keys` indexes its keys in the
    K/V gathered from all CP ranks (rank 0's rows, then rank 1's, ...; at cp=1 this rank's own rows), segment after
    segment; `cu_q`/`cu_k` and `max_q`/`max_k` are the varlen segments (see attention_segments). Built on the host with the batch, so that
    attention never reads cu_seqlens back from the device (a GPU sync)."""

    keys: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    def map(self, fn) -> "AttentionPlan":
        return AttentionPlan(*(fn(x) for x in (self.keys, self.cu_q, self.cu_k)), self.max_q, self.max_k)

    def to(self, device) -> "AttentionPlan":
        return self.map(lambda x: x.to(device, non_blocking=True))


def attention_plan(padded: np.ndarray, cp: int, rank: int, contexts: np.ndarray | None = None,
                   lengths: np.ndarray | None = None) -> AttentionPlan:
    """The plan of attention_segments; at cp=1 (shared prompts without CP) the keys are this rank's own rows."""
    cu_q, cu_k, key_positions = attention_segments(padded, cp, rank, contexts, lengths)
    keys = global_order(padded, cp)[key_positions] if cp > 1 else key_positions
    return AttentionPlan(torch.from_numpy(keys), torch.from_numpy(cu_q), torch.from_numpy(cu_k),
                         int(np.diff(cu_q).max()), int(np.diff(cu_k).max()))
