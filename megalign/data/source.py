"""What training reads from a dataset: the `PackSource` interface, and packs held in memory.

The trainer, the batch builder and the checkpoints use nothing else of a dataset, so anything with these
members trains: `PackedDataset` (the files tools/preprocess_data.py writes) and `InMemoryPacks` (tests,
benchmarks, packs made on the fly).
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from megalign.data.groups import check_roles
from megalign.data.packed_dataset import Pack


@runtime_checkable
class PackSource(Protocol):
    def __len__(self) -> int:
        """The number of packs."""

    def __getitem__(self, k: int) -> Pack:
        """Pack k: tokens, loss mask, per-sample lengths."""

    def pack_sample_lengths(self, k: int) -> np.ndarray:
        """The per-sample lengths of pack k, without reading its tokens (for counting)."""

    @property
    def vocab_size(self) -> int:
        """The vocabulary of the tokenizer the ids come from (the model's, unless model.vocab_size says more)."""

    @property
    def max_token_id(self) -> int | None:
        """The largest token id of any pack, if known without reading them (checked before training starts)."""

    def fingerprint(self) -> dict:
        """What a checkpoint records to recognise this data on resume: {"path": str, "sha256": {...}}."""


class InMemoryPacks:
    """Packs held in memory, e.g. `InMemoryPacks([Pack(tokens, loss_mask, lengths), ...], vocab_size=600)`."""

    def __init__(self, packs: Sequence[Pack], vocab_size: int, name: str = "in-memory"):
        if not packs:
            raise ValueError("InMemoryPacks needs at least one pack")
        for i, p in enumerate(packs):
            if int(np.sum(p.lengths)) != len(p.tokens) or len(p.loss_mask) != len(p.tokens):
                raise ValueError(f"pack {i}: lengths sum to {int(np.sum(p.lengths))}, {len(p.tokens)} tokens, "
                                 f"{len(p.loss_mask)} loss-mask values")
            if p.position_offsets is not None and len(p.position_offsets) != len(p.lengths):
                raise ValueError(f"pack {i}: {len(p.position_offsets)} position offsets for {len(p.lengths)} samples")
            for field_name in ("roles", "reference_logps"):
                values = getattr(p, field_name)
                if values is not None and len(values) != len(p.lengths):
                    raise ValueError(f"pack {i}: {len(values)} {field_name} for {len(p.lengths)} samples")
            if p.roles is not None:
                try:
                    check_roles(p.roles)
                except ValueError as e:
                    raise ValueError(f"pack {i}: {e}") from None
        self.packs = list(packs)
        self._vocab_size = int(vocab_size)
        self.name = name

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> Pack:
        return self.packs[k]

    def pack_sample_lengths(self, k: int) -> np.ndarray:
        return np.asarray(self.packs[k].lengths)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_token_id(self) -> int:
        return max(int(p.tokens.max()) for p in self.packs if len(p.tokens))

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for p in self.packs:
            for a in (p.tokens, p.loss_mask, p.lengths) + (() if p.position_offsets is None else (p.position_offsets,)):
                digest.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            if p.roles is not None:
                digest.update(b"roles" + np.ascontiguousarray(p.roles, dtype=np.int64).tobytes())
            if p.reference_logps is not None:
                digest.update(b"reference" + np.ascontiguousarray(p.reference_logps, dtype=np.float64).tobytes())
        return {"path": self.name, "sha256": {"packs": digest.hexdigest()}}
