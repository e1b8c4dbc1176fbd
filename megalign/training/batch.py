"""A pack as a THD micro-batch: samples concatenated, never attending across a boundary.

  tokens[t]        the pack's token ids
  labels[t]        the next token inside the same sample (a sample's last token has no target)
  loss             what the objective needs (training/objective.py), e.g. sft's per-token weights and the count
  position_ids[t]  0, 1, ... restarting at every sample (from the sample's position offset: the pieces of a long
                   document with `--positions continue`), or the positions given (SkipAlign: data/positions.py)
  cu_seqlens[n+1]  sample boundaries; max_seqlen is the longest SINGLE sample (megatron's THD RoPE switches to
                   global positions when it equals the packed length)

Under context parallelism (`context_parallel_share`) a rank holds its chunks of every sample (see
parallel/context.py): tokens, labels and per-token loss inputs are its share; cu_seqlens stay those of the whole
row, with cu_seqlens_padded for the padded row, position_ids cover the whole padded row (megatron cuts RoPE's
angles per rank itself), and the attention plan is computed here, on the host. The count goes to CP rank 0
only: megatron sums counts over the CP group.

Under sequence parallelism a rank's tokens split over the TP ranks, so their number must divide by tp: with
CP, every sample is padded to lcm(2cp, tp*cp) instead of 2cp; without CP, the pack ends with one padding
segment of fewer than tp tokens (`pad_to_multiple`: a sample of its own that nothing attends across, and no
loss weight), which costs fewer tokens than padding every sample would.

Preference packs (Pack.roles: groups of a prompt and its responses) become the segments of
training/preference.py `group_rows` (data.prompt: shared or duplicate): `contexts[s]` names the segment whose keys
segment s reads before its own (a response its shared prompt), which the attention plan expresses, at CP=1 too.

`BatchBuilder` is the pure function from a pack reference to this rank's micro-batch that the trainer uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megalign.config import DataConfig
from megalign.data.packed_dataset import Pack
from megalign.data.positions import contiguous_positions, pack_positions
from megalign.data.sampler import PackRef
from megalign.data.source import PackSource
from megalign.errors import MegalignError
from megalign.model.attention import ThdParams
from megalign.parallel import context
from megalign.training.objective import LossInputs


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss: LossInputs
    num_targets: int
    cu_seqlens_padded: torch.Tensor | None = None  # context parallelism: samples padded to a multiple of 2*cp
    cp_plan: context.AttentionPlan | None = None  # context parallelism or shared prompts: this rank's attention plan
    contexts: np.ndarray | None = None  # shared prompts: per segment, the segment it reads first (-1: none); host only

    def packed_seq_params(self) -> ThdParams:
        return ThdParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                         cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
                         max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen, cp_plan=self.cp_plan)

    def map(self, fn) -> "Batch":
        """The batch with `fn` applied to each of its tensors (the attention plan's too)."""
        def each(x):
            return None if x is None else fn(x)

        loss = LossInputs({k: each(v) for k, v in self.loss.per_token.items()}, each(self.loss.count),
                          {k: each(v) for k, v in self.loss.groups.items()})
        return dataclasses.replace(self, tokens=each(self.tokens), labels=each(self.labels),
                                   position_ids=each(self.position_ids), cu_seqlens=each(self.cu_seqlens),
                                   loss=loss, cu_seqlens_padded=each(self.cu_seqlens_padded),
                                   cp_plan=None if self.cp_plan is None else self.cp_plan.map(fn))

    def to(self, device) -> "Batch":
        return self.map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        return self.map(lambda x: x.pin_memory())

    def record_stream(self, stream) -> None:
        self.map(lambda x: x.record_stream(stream) or x)


def thd_batch(pack: Pack, objective, positions: np.ndarray | None = None, responses=None) -> Batch:
    """The whole pack as one micro-batch for `objective` (training/objective.py). `positions`: the pack's position
    ids ([t], e.g. data/positions.py's SkipAlign ones); None: 0, 1, ... per sample, from its position offset.
    `responses` (preference.Responses): which samples are responses, for a preference objective."""
    lengths = np.asarray(pack.lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = pack.tokens.astype(np.int64)
    last = starts + lengths - 1  # a sample's last token predicts nothing inside the sample
    labels = np.roll(tokens, -1)
    labels[last] = 0
    targets = np.roll(pack.loss_mask.astype(np.float64), -1)
    targets[last] = 0.0
    if positions is None:
        positions = contiguous_positions(lengths, pack.position_offsets)
    elif np.shape(positions) != tokens.shape:
        raise ValueError(f"{np.shape(positions)} positions for a pack of {len(tokens)} tokens")
    else:
        positions = np.asarray(positions, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return Batch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lengths.max()),
        loss=objective.loss_inputs(targets, lengths) if responses is None else
        objective.loss_inputs(targets, lengths, responses),
        num_targets=int(targets.sum()),
    )


def preference_batch(pack: Pack, objective, positions: np.ndarray, shared: bool = True) -> Batch:
    """A preference pack (roles) as the segments of preference.group_rows, with `positions` of the pack's tokens
    (the responses' continuing their prompt's: data/positions.py). Shared prompts carry their attention plan."""
    from megalign.training.preference import group_rows

    rows = group_rows(pack.roles, pack.lengths, shared, getattr(pack, "reference_logps", None))
    segments = Pack(pack.tokens[rows.index], pack.loss_mask[rows.index], rows.lengths)
    batch = thd_batch(segments, objective, np.asarray(positions)[rows.index], rows.responses)
    return dataclasses.replace(batch, contexts=rows.contexts) if (rows.contexts >= 0).any() else batch


def with_context_plan(batch: Batch) -> Batch:
    """Without CP: the attention plan of a batch whose segments read other segments' keys (shared prompts)."""
    if batch.contexts is None:
        return batch
    lengths = np.diff(batch.cu_seqlens.numpy()).astype(np.int64)
    return dataclasses.replace(batch, cp_plan=context.attention_plan(lengths, 1, 0, batch.contexts, lengths))


def pad_to_multiple(batch: Batch, multiple: int) -> Batch:
    """The whole-row batch with a padding segment at its end, so that its length is a multiple of `multiple`:
    token 0, no target, no loss weight, positions 0.. of its own; the real samples are untouched."""
    extra = -len(batch.tokens) % multiple
    if extra == 0:
        return batch

    def padded(x: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([x, torch.zeros(extra, dtype=x.dtype) if fill is None else fill.to(x.dtype)])

    cu = batch.cu_seqlens
    return dataclasses.replace(
        batch, tokens=padded(batch.tokens), labels=padded(batch.labels),
        position_ids=padded(batch.position_ids, torch.arange(extra)),
        cu_seqlens=torch.cat([cu, cu[-1:] + extra]), max_seqlen=max(batch.max_seqlen, extra),
        loss=dataclasses.replace(batch.loss, per_token={k: padded(v) for k, v in batch.loss.per_token.items()}),
        contexts=None if batch.contexts is None else np.append(batch.contexts, -1))


def context_parallel_share(batch: Batch, cp: int, rank: int, multiple: int | None = None) -> Batch:
    """Rank `rank`'s share of a whole-row batch under context parallelism of size `cp` (loss inputs and counts
    come from the whole row, so the global loss is the CP=1 loss), with its attention plan. Every sample is
    padded to a multiple of `multiple` (default 2*cp; context.sample_multiple)."""
    lengths = np.diff(batch.cu_seqlens.numpy()).astype(np.int64)
    padded = context.padded_lengths(lengths, cp, multiple)
    source = context.padding_index(lengths, cp, multiple)
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
    count = batch.loss.count if rank == 0 else torch.zeros_like(batch.loss.count)
    return dataclasses.replace(
        batch,
        tokens=share(batch.tokens),
        labels=share(batch.labels),
        position_ids=torch.from_numpy(padded_positions),
        max_seqlen=int(padded.max()),
        loss=dataclasses.replace(batch.loss, per_token={k: share(v) for k, v in batch.loss.per_token.items()},
                                 count=count),
        cu_seqlens_padded=torch.from_numpy(np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)),
        cp_plan=context.attention_plan(padded, cp, rank, batch.contexts, lengths),
    )


@dataclass(frozen=True)
class BatchBuilder:
    """Pack reference -> this rank's micro-batch, on the host: a pure function of the reference (the same on every
    call, rank and resume). `data` gives the positions (data.positions and the SkipAlign keys); `max_positions`
    is the SkipAlign window when data.skipalign_window is unset (model.max_position_embeddings); token ids must be
    below `vocab_size` (the model's vocabulary: a larger id is a damaged pack or another tokenizer's)."""

    datasets: Sequence[PackSource]
    data: DataConfig
    objective: object
    seed: int
    max_positions: int
    vocab_size: int
    cp: int = 1
    cp_rank: int = 0
    sequence_parallel_tp: int = 1  # under sequence parallelism, the TP size this rank's tokens split over

    def build(self, ref: PackRef) -> Batch:
        pack, d = self.datasets[ref.dataset][ref.pack], self.data
        if len(pack.tokens) and int(pack.tokens.max()) >= self.vocab_size:
            source = self.datasets[ref.dataset].fingerprint()["path"]
            raise MegalignError(
                f"dataset {source}, pack {ref.pack}: token id {int(pack.tokens.max())} is outside the model's "
                f"vocabulary of {self.vocab_size}: the dataset is damaged (tools/inspect_dataset.py --verify full "
                "checks it) or was made with another tokenizer than model.vocab_size says")
        if pack.position_offsets is not None and len(pack.lengths):
            self._check_continued_positions(pack, ref)
        preference = self._check_preference(pack, ref)
        # positions of the whole row, before the CP split (which keeps the whole padded row's positions)
        window = (d.logo_window if d.positions == "logo" else d.skipalign_window) or self.max_positions
        positions = pack_positions(pack, d.positions, window, d.skipalign_fraction, self.seed, ref.dataset, ref.pack,
                                   ref.epoch, d.logo_chunk)
        if preference:
            batch = preference_batch(pack, self.objective, positions, shared=d.prompt == "shared")
        else:
            batch = thd_batch(pack, self.objective, positions)
        tp = self.sequence_parallel_tp
        if self.cp > 1:
            batch = context_parallel_share(batch, self.cp, self.cp_rank,
                                           context.sample_multiple(self.cp, tp, sequence_parallel=tp > 1))
        else:
            batch = with_context_plan(pad_to_multiple(batch, tp) if tp > 1 else batch)
        return batch

    def _check_preference(self, pack: Pack, ref: PackRef) -> bool:
        """Whether `pack` is built as preference groups: a preference objective needs preference packs (and,
        for dpo, ipo and longpo, a reference log-prob per response); sft refuses them."""
        wants = getattr(self.objective, "preference", False)
        roles, reference = getattr(pack, "roles", None), getattr(pack, "reference_logps", None)
        missing = wants and roles is not None and self.objective.needs_reference and (
            reference is None or np.isnan(np.asarray(reference, dtype=np.float64)[np.asarray(roles) > 0]).any())
        if wants == (roles is not None) and not missing:
            return wants
        source = self.datasets[ref.dataset].fingerprint()["path"]
        name = getattr(self.objective, "name", "sft")
        if wants and roles is None:
            raise MegalignError(f"dataset {source}, pack {ref.pack}: training.objective={name} needs preference data "
                                "(groups of a prompt, a chosen and rejected answers: records with chosen/rejected, "
                                "preprocessed by tools/preprocess_data.py); for chat or text data use "
                                "training.objective=sft")
        if not wants and roles is not None:
            raise MegalignError(f"dataset {source} holds preference groups (a prompt, a chosen and rejected answers): "
                                f"training.objective={name} would train on the answers without their prompts; set "
                                "training.objective to one of dpo, ipo, simpo, orpo, logo, longpo")
        raise MegalignError(f"dataset {source}, pack {ref.pack}: training.objective={name} needs the reference "
                            "model's log-prob of every response, and the dataset has none: score it with "
                            "tools/score_reference.py (or preprocess records that carry precomputed reference "
                            "scores), or use a reference-free objective (simpo, orpo, logo)")

    def _check_continued_positions(self, pack: Pack, ref: PackRef) -> None:
        """Pieces whose positions continue their document's reach past the pack: not past the model's positions."""
        end = int(np.max(np.asarray(pack.position_offsets) + np.asarray(pack.lengths)))
        if end > self.max_positions:
            source = self.datasets[ref.dataset].fingerprint()["path"]
            raise MegalignError(
                f"dataset {source}, pack {ref.pack}: a document's piece reaches position {end - 1} (preprocessed with "
                f"--positions continue), beyond model.max_position_embeddings={self.max_positions}: raise it to at "
                "least the dataset's documents.max_position, or preprocess with --positions restart")

    def sequence_lengths(self, refs: Sequence[PackRef]) -> list[int]:
        """The lengths of every sample in the packs `refs`, in order."""
        return [int(n) for r in refs for n in self.datasets[r.dataset].pack_sample_lengths(r.pack)]

    def replace(self, **changes) -> "BatchBuilder":
        """The same builder with other parts: e.g. .replace(objective=SFT("token")) or other datasets."""
        return dataclasses.replace(self, **changes)
