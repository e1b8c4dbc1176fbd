"""A pack as a THD micro-batch: samples concatenated, never attending across a boundary.

  tokens[t]        the pack's token ids
  labels[t]        the next token inside the same sample (a sample's last token has no target)
  loss_weight[t]   the LongAlign weight of token t's target (0 where it is not a target; see loss.py)
  position_ids[t]  0, 1, ... restarting at every sample
  cu_seqlens[n+1]  sample boundaries; max_seqlen is the longest SINGLE sample (megatron's THD RoPE switches to
                   global positions when it equals the packed length)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megalign.data.packed_dataset import Pack
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

    def packed_seq_params(self) -> PackedSeqParams:
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def to(self, device) -> "Batch":
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.loss_weight), move(self.position_ids),
                     move(self.cu_seqlens), self.max_seqlen, move(self.count), self.num_targets)


def thd_batch(pack: Pack, loss_mode: str) -> Batch:
    lengths = np.asarray(pack.lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = pack.tokens.astype(np.int64)
    last = starts + lengths - 1  # a sample's last token predicts nothing inside the sample
    labels = np.roll(tokens, -1)
    labels[last] = 0
    targets = np.roll(pack.loss_mask.astype(np.float64), -1)
    targets[last] = 0.0
    weights, count = token_weights(targets, lengths, loss_mode)
    positions = np.arange(len(tokens)) - np.repeat(starts, lengths)
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
