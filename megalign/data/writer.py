"""Write packs as format v1 (see format.py): two megatron-core IndexedDatasets with pack boundaries as
documents. Files are written under temporary names; `publish` renames them into place, metadata last."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from megalign.data import format as fmt
from megalign.data.sample_store import SampleStore


def write_packs(
    prefix: str,
    store: SampleStore,
    sample_slots: np.ndarray,
    packs: list[list[int]],
    token_dtype: type,
    on_pack: Callable[[int], None] = lambda n: None,
) -> None:
    """Write the token and loss-mask IndexedDatasets of `packs` (lists of sample ids) at `prefix`."""
    # megatron-core imports torch: only the writing process pays for it, not the tokenizer workers.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokens_builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype)
    mask_builder = IndexedDatasetBuilder(prefix + fmt.LOSS_MASK_SUFFIX + ".bin", dtype=np.uint8)
    for samples in packs:
        parts = [store.get(int(sample_slots[s])) for s in samples]
        lengths = [len(t) for t, _ in parts]
        tokens_builder.add_document(np.concatenate([t for t, _ in parts]), lengths)
        mask_builder.add_document(np.concatenate([m for _, m in parts]), lengths)
        on_pack(sum(lengths))
    tokens_builder.finalize(prefix + ".idx")
    mask_builder.finalize(prefix + fmt.LOSS_MASK_SUFFIX + ".idx")


def file_records(prefix: str) -> dict[str, dict]:
    """Size and sha256 of each data file, keyed by its suffix (what PREFIX.json stores)."""
    return {
        suffix: {"bytes": os.path.getsize(prefix + suffix), "sha256": fmt.sha256_file(Path(prefix + suffix))}
        for suffix in fmt.DATA_SUFFIXES
    }


def publish(temp_prefix: str, prefix: str) -> None:
    """Move a complete dataset into place. The metadata file goes last: a dataset without it is unreadable."""
    for suffix in fmt.DATA_SUFFIXES + (fmt.REJECTS_SUFFIX, fmt.META_SUFFIX):
        if os.path.exists(temp_prefix + suffix):
            os.replace(temp_prefix + suffix, prefix + suffix)


def remove_dataset(prefix: str) -> None:
    """Delete an existing dataset, metadata first so that a half-deleted one is never mistaken for whole."""
    for path in [fmt.meta_file(prefix)] + fmt.data_files(prefix) + [fmt.rejects_file(prefix)]:
        if path.exists():
            path.unlink()
