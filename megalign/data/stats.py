"""Dataset statistics stored in PREFIX.json and shown by inspect_dataset: histograms, efficiency, counts."""

from __future__ import annotations

import math

import numpy as np


def length_histogram(lengths: np.ndarray, seq_length: int) -> dict:
    """Counts of sample lengths in power-of-two bins [1, 2), [2, 4), ... the last one closed at 2^k >= seq_length."""
    top = max(1, math.ceil(math.log2(max(seq_length, 2))))
    edges = [2**k for k in range(top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges, "counts": counts.astype(int).tolist()}


def pack_fill_histogram(pack_lengths: np.ndarray, seq_length: int, bins: int = 10) -> dict:
    """Counts of packs by fill fraction (tokens / seq_length) in `bins` equal bins over [0, 1]."""
    counts, edges = np.histogram(np.asarray(pack_lengths) / seq_length, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist()}


def reconcile(counts: dict) -> None:
    """read = kept - duplicated + sampled_out + rejected: every record is accounted for."""
    rejected = sum(counts["rejected"].values())
    accounted = counts["kept"] - counts["duplicated"] + counts["sampled_out"] + rejected
    if accounted != counts["read"]:
        raise AssertionError(f"record counts do not reconcile: read {counts['read']} != accounted {accounted}: {counts}")
