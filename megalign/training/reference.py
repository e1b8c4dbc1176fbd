"""The offline reference scoring pass (tools/score_reference.py): a megalign checkpoint's summed log-prob of every
response of the preference dataset(s) at data.path, written beside each dataset for dpo, ipo and longpo, so that
training holds one model.

The pass is the trainer's own forward-only pass (Trainer.forward_sums: megatron's schedule at any TP/PP/CP/DP
layout) over every pack in order, with an objective whose "loss" is the table of the per-response sums that the
preference objectives compute (preference.Preference.response_logps: the same row layout, shared prompt or
duplicated, totalled over the CP group). Each round of packs fills its slice of the dataset's table: a response's
sum lands at its sequence's slot, spoken once (the last pipeline stage, TP rank 0, CP rank 0) and all-reduced, so
every rank ends with the whole table. Positions are contiguous (the reference reads each response at its real
position, as validation does), whatever data.positions says.

Output, published atomically (temporary file, fsync, rename; the record last):

  PREFIX.reference.npy   float64 per sequence (.idx order): a response's reference log-prob sum, NaN for prompts
  PREFIX.reference.json  the model (checkpoint path, kind, step), the dataset's checksums (PREFIX.json's files;
                         PackedDataset reads the scores only while they match), the .npy's sha256, the layout

LongPO (`short`): the scores are computed on a second dataset holding the same groups with short prompts, and
written for the long one; groups are matched by their responses' tokens (the two may be packed in other orders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from megalign.config import Config, updated
from megalign.data import format as fmt
from megalign.data.groups import PROMPT
from megalign.data.sampler import PackRef
from megalign.errors import MegalignError
from megalign.files import fsync_path, write_atomically
from megalign.training.batch import BatchBuilder
from megalign.training.preference import Preference

RECORD_KIND = "megalign reference scores"
RECORD_VERSION = 1


@dataclass(frozen=True)
class ScoreTable:
    """An objective that reports each response's summed log-prob at its slot of a table of `size` (the round's
    sequences); no loss, no gradient. `base` computes the sums (any preference objective: they share them)."""

    size: int
    base: Preference = Preference("dpo", 0.1)
    name: ClassVar[str] = "reference"
    preference: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False  # it computes them

    def loss_inputs(self, targets, lengths, responses):
        return self.base.loss_inputs(targets, lengths, responses)

    def loss(self, per_token_loss: torch.Tensor, inputs):
        sums = self.base.response_logps(per_token_loss, inputs).detach()
        table = torch.zeros(self.size, dtype=torch.float64, device=sums.device)
        table.index_add_(0, inputs.groups["slot"], sums.double())
        speaks = (inputs.count > 0).to(table.dtype)  # CP rank 0: the totals are the same on every CP rank
        return per_token_loss.sum() * 0, inputs.count, {"scores": table * speaks}

    def sums(self, reports: list[dict]) -> torch.Tensor:
        total = torch.zeros(self.size, dtype=torch.float64)
        for r in reports:
            total += r["scores"].double().cpu()
        return total

    def metrics(self, sums: torch.Tensor) -> dict:
        return {"scores": sums}


@dataclass(frozen=True)
class _ScoringBuilder(BatchBuilder):
    """The run's batch builder, each batch also carrying its responses' slots in the round's table."""

    first_slot: dict = field(default_factory=dict)  # pack -> the slot of its first sequence

    def build(self, ref: PackRef):
        batch = super().build(ref)
        roles = np.asarray(self.datasets[ref.dataset][ref.pack].roles)
        # group_rows lists the responses in sample order: the pack's non-prompt samples
        slots = torch.from_numpy(self.first_slot[ref.pack] + np.flatnonzero(roles != PROMPT).astype(np.int64))
        return dataclasses.replace(batch, loss=dataclasses.replace(batch.loss, groups={**batch.loss.groups,
                                                                                       "slot": slots}))


def score_dataset(trainer, d: int) -> np.ndarray:
    """Every sequence's reference log-prob sum of dataset `d` of `trainer` (NaN for prompts), on every rank."""
    ds, layout = trainer.datasets[d], trainer.layout
    counts = np.array([len(ds.pack_sample_lengths(k)) for k in range(len(ds))], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    scores = np.full(int(starts[-1]), np.nan)
    data = dataclasses.replace(trainer.cfg.data, positions="contiguous")
    base = {f.name: getattr(trainer.batches, f.name) for f in dataclasses.fields(BatchBuilder)}
    per_round = max(1, trainer.cfg.training.global_batch // layout.dp) * layout.dp
    for a in range(0, len(ds), per_round):  # every rank runs every round (collectives), its share of the packs
        packs = range(a, min(a + per_round, len(ds)))
        first, end = int(starts[a]), int(starts[packs[-1] + 1])
        builder = _ScoringBuilder(**{**base, "data": data, "objective": ScoreTable(end - first)},
                                  first_slot={k: int(starts[k]) - first for k in packs})
        mine = [PackRef(d, k) for k in packs][layout.dp_rank::layout.dp]
        table = trainer.forward_sums(mine, forward_only=True, batches=builder).numpy()
        roles = np.concatenate([np.asarray(ds[k].roles) for k in packs])
        scores[first:end] = np.where(roles == PROMPT, np.nan, table)
    return scores


def _groups(ds) -> list[tuple[tuple, list[int], int]]:
    """Per group of `ds`: its responses' tokens (a key), their sequence indices, its pack."""
    groups, sequence = [], 0
    for k in range(len(ds)):
        pack = ds[k]
        starts = np.concatenate([[0], np.cumsum(pack.lengths)])
        for i, role in enumerate(np.asarray(pack.roles).tolist()):
            if role == PROMPT:
                groups.append(((), [], k))
            else:
                key, seqs, _ = groups[-1]
                groups[-1] = (key + (pack.tokens[starts[i]:starts[i + 1]].astype(np.int64).tobytes(),),
                              seqs + [sequence + i], k)
        sequence += len(pack.lengths)
    return groups


def short_to_long(short_ds, long_ds) -> tuple[np.ndarray, np.ndarray]:
    """Where the scores of `short_ds` (the same groups with short prompts) go in `long_ds`: (long sequence
    indices, short sequence indices), the groups matched by their responses' tokens."""
    short_groups, long_groups = _groups(short_ds), _groups(long_ds)
    where = f"--short-data {short_ds.prefix} for {long_ds.prefix}"
    if len(short_groups) != len(long_groups):
        raise MegalignError(f"{where}: {len(short_groups)} groups against {len(long_groups)}; the short dataset must "
                            "hold the same groups (prompt shortened, the same responses)")
    by_responses = defaultdict(deque)
    for key, seqs, _ in short_groups:
        by_responses[key].append(seqs)
    to, source = [], []
    for g, (key, seqs, pack) in enumerate(long_groups):
        if not by_responses.get(key):
            raise MegalignError(f"{where}: group {g} (pack {pack}) has no group with the same response tokens in the "
                                "short dataset; preprocess both from the same records with the same tokenizer and "
                                "chat template, only the prompts shortened")
        to += seqs
        source += by_responses[key].popleft()
    return np.array(to, dtype=np.int64), np.array(source, dtype=np.int64)


def _sequences(ds) -> int:
    return int(sum(len(ds.pack_sample_lengths(k)) for k in range(len(ds))))


def write_scores(prefix: str, scores: np.ndarray, record: dict) -> tuple[Path, Path]:
    """PREFIX.reference.npy then PREFIX.reference.json (which names the .npy's sha256), each atomically."""
    npy, meta = fmt.scores_file(prefix), fmt.scores_meta_file(prefix)
    tmp = npy.with_name(f".{npy.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(scores, dtype=np.float64))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, npy)
    fsync_path(npy.parent)
    record = {**record, "scores": {"file": npy.name, "sha256": fmt.sha256_file(npy), "sequences": len(scores),
                                   "responses": int(np.isfinite(scores).sum())}}
    write_atomically(meta, json.dumps(record, indent=1) + "\n")
    return npy, meta


def score(cfg: Config, model: str | None = None, short: Sequence[str] | None = None) -> list[Path]:
    """Score every dataset of data.path with the checkpoint `model` (default checkpoint.init_from), on the short
    datasets `short` (one per data.path) for LongPO; returns the score files written (collective)."""
    import torch.distributed as dist

    from megalign import checkpoint as ckpt
    from megalign.data.packed_dataset import PackedDataset
    from megalign.training.trainer import Trainer

    model = model or cfg.checkpoint.init_from
    if not model:
        raise MegalignError("no model to score with: pass --model CHECKPOINT or set checkpoint.init_from")
    paths = cfg.data_paths
    if short and len(short) != len(paths):
        raise MegalignError(f"--short-data names {len(short)} datasets for the {len(paths)} of data.path: give one "
                            "short dataset per data.path entry, in the same order")
    # weights only, never a resume of the run directory's training checkpoints
    cfg = updated(cfg, checkpoint={"init_from": model, "resume": False, "resume_from": None}, data={"prefetch": False})
    longs = [PackedDataset(p, verify=cfg.data.verify, scores=False) for p in paths]
    scored = [PackedDataset(p, verify=cfg.data.verify, scores=False) for p in short] if short else longs
    for ds in scored + longs:
        if ds.meta.get("record_kind") != "preference":
            raise MegalignError(f"dataset {ds.prefix} holds no preference groups: reference scores are for "
                                "preference data (records with chosen/rejected, tools/preprocess_data.py)")
    # LongPO: the groups matched before any work (every rank checks: an error stops them all)
    matches = [short_to_long(s, ds) for s, ds in zip(scored, longs)] if short else None
    trainer = Trainer(cfg, datasets=scored, objective=ScoreTable(1))
    manifest = ckpt.read_manifest(ckpt.resolve(model))
    layout = trainer.layout
    written = []
    for d, (long_ds, ds) in enumerate(zip(longs, scored)):
        scores = score_dataset(trainer, d)
        if short:
            to, source = matches[d]
            scores, short_scores = np.full(_sequences(long_ds), np.nan), scores
            scores[to] = short_scores[source]
        if dist.get_rank() == 0:
            record = {"kind": RECORD_KIND, "version": RECORD_VERSION,
                      "model": {"path": str(ckpt.resolve(model)), "kind": manifest.get("kind"),
                                "step": manifest.get("step")},
                      "dataset": long_ds.fingerprint(),
                      "scored_on": ds.fingerprint() if short else None,
                      "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp},
                      "params_dtype": str(trainer.runtime.params_dtype).replace("torch.", ""),
                      "prompt": cfg.data.prompt, "positions": "contiguous"}
            written.append(write_scores(long_ds.prefix, scores, record)[0])
            if long_ds.meta["preference"].get("reference_logps"):
                print(f"note: {long_ds.prefix} carries reference scores from its records "
                      f"({fmt.reference_logps_file(long_ds.prefix).name}), which training reads instead of "
                      f"{written[-1].name}", file=sys.stderr)
        dist.barrier()  # published before any rank returns
    return written


def run(config_path: str | None, overrides: list[str], model: str | None = None,
        short: Sequence[str] | None = None) -> list[Path]:
    """tools/score_reference.py: the config (as megalign.train reads it), checked, then `score`."""
    from megalign import megatron_compat
    from megalign.config import load_config, validate
    from megalign.parallel.launcher import world_size_from_env
    from megalign.parallel.setup import shutdown

    cfg = load_config(config_path, overrides)
    validate(cfg, world_size_from_env())
    megatron_compat.quiet_known_warnings()
    try:
        return score(cfg, model, short)
    finally:
        shutdown()
