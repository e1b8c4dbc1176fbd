"""Dataset statistics stored in PREFIX.json and shown by inspect_dataset: histograms, efficiency, counts."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

RECORD_COUNTS = ("read", "kept", "duplicated", "sampled_out", "truncated", "blank_lines")
# text records only (each times the record's copies): documents cut into pieces, samples and tokens written, tails
# under min_piece_length dropped (a mix's share of tokens per input is tokens / the total)
DOCUMENT_COUNTS = ("split", "samples", "tokens", "tails_dropped", "tail_tokens_dropped")


@dataclass
class InputCounts:
    """What became of one input's records. `kept` counts records (times their copies); for text records `samples`
    counts the pieces written, so a document cut in three is one kept record and three samples."""

    path: str
    ratio: float
    kind: str = "chat"  # records.CHAT or records.TEXT: text inputs also carry DOCUMENT_COUNTS
    read: int = 0
    kept: int = 0
    duplicated: int = 0
    sampled_out: int = 0
    truncated: int = 0
    blank_lines: int = 0
    split: int = 0
    samples: int = 0
    tokens: int = 0
    tails_dropped: int = 0
    tail_tokens_dropped: int = 0
    rejected: Counter = field(default_factory=Counter)

    def keys(self) -> tuple[str, ...]:
        return RECORD_COUNTS + (DOCUMENT_COUNTS if self.kind == "text" else ())

    def as_dict(self) -> dict:
        d = {"path": self.path, "ratio": self.ratio, **{k: getattr(self, k) for k in self.keys()}}
        d["rejected"] = dict(sorted(self.rejected.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputCounts":
        kind = "text" if "samples" in d else "chat"
        numbers = {k: d[k] for k in RECORD_COUNTS + (DOCUMENT_COUNTS if kind == "text" else ())}
        return cls(d["path"], d["ratio"], kind, **numbers, rejected=Counter(d["rejected"]))

    def add(self, other: "InputCounts") -> None:
        for k in self.keys():
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.rejected.update(other.rejected)


def total_counts(counts: list[InputCounts]) -> dict:
    """The counts of all inputs added up (the metadata's `counts`)."""
    rejected = Counter()
    for c in counts:
        rejected.update(c.rejected)
    keys = counts[0].keys() if counts else RECORD_COUNTS
    total = {k: sum(getattr(c, k) for c in counts) for k in keys}
    total["rejected"] = dict(sorted(rejected.items()))
    return total


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
