"""What one micro-batch holds, as the planner needs it: the longest pack (memory is sized for it) and the mean
pack (step time is modelled on it).

A micro-batch is one pack (THD, no padding between samples). Memory follows the pack's token count, not its
samples: activations are per token, and FlashAttention-style kernels keep no per-sample n x n scores. So memory is
sized for a full pack of `seq_length` tokens, the most a pack can hold. Step time follows the mean pack: its
tokens (the dense FLOPs) and the sum of its samples' squared lengths (the causal attention FLOPs).

From a dataset (`PREFIX.json`, written by tools/preprocess_data.py): seq_length, num_tokens / num_packs,
num_samples / num_packs, and the sample-length histogram (power-of-two bins), whose bins give E[n^2] as if
lengths were uniform inside each bin: (a^2 + ab + b^2) / 3 for a bin [a, b). From `--seq-length N`: packs of one
sample of N tokens (the most attention work a pack of N can need).
"""

from __future__ import annotations

from dataclasses import dataclass

from megalign.errors import MegalignError, OptionError


@dataclass(frozen=True)
class Workload:
    seq_length: int  # tokens of the longest pack (the pack length)
    mean_pack_tokens: float  # tokens of the mean pack
    mean_samples_per_pack: float
    mean_square_tokens: float  # E[sum over a pack's samples of n^2]: the causal attention work of the mean pack
    source: str  # where it came from, for the report
    vocab_size: int | None = None  # the dataset tokenizer's vocabulary, when known
    # how many different longest-sample lengths micro-batches have (megatron caches a RoPE table per length, up
    # to 32: memory.py); 32 for a dataset, an upper bound
    distinct_lengths: int = 1

    @property
    def equivalent_sample_length(self) -> float:
        """The length of one sample with the mean pack's attention work (sqrt of the summed squares)."""
        return self.mean_square_tokens ** 0.5


def fixed_length(seq_length: int) -> Workload:
    """Packs of one sample of `seq_length` tokens."""
    if seq_length < 1:
        raise OptionError("seq_length", f"{seq_length} must be >= 1 (tokens per pack)")
    return Workload(seq_length, float(seq_length), 1.0, float(seq_length) ** 2, f"packs of {seq_length:,} tokens")


def from_metadata(meta: dict, name: str) -> Workload:
    """The workload of a dataset's metadata (the PREFIX.json dictionary)."""
    missing = [k for k in ("num_tokens", "num_samples", "num_packs", "seq_length") if not isinstance(meta.get(k), int)]
    if missing:
        raise MegalignError(f"{name}: its metadata lacks {missing[0]}; re-run tools/preprocess_data.py")
    packs = meta["num_packs"]
    if packs < 1:
        raise MegalignError(f"{name}: the dataset holds no packs")
    histogram = meta.get("length_histogram") or {}
    edges, counts = histogram.get("edges"), histogram.get("counts")
    if not edges or not counts or len(edges) != len(counts) + 1 or sum(counts) == 0:
        raise MegalignError(f"{name}: its metadata has no sample-length histogram (length_histogram); re-run "
                            "tools/preprocess_data.py")
    seq_length = int(meta["seq_length"])
    square_sum = 0.0
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        low, high = min(low, seq_length), min(high, seq_length)
        square_sum += count * (low * low + low * high + high * high) / 3
    return Workload(seq_length=seq_length, mean_pack_tokens=meta["num_tokens"] / packs,
                    mean_samples_per_pack=meta["num_samples"] / packs, mean_square_tokens=square_sum / packs,
                    source=f"{name} ({packs:,} packs of up to {seq_length:,} tokens, "
                           f"{meta['num_tokens'] / packs:,.0f} on average)",
                    vocab_size=int(meta["tokenizer"]["vocab_size"]), distinct_lengths=min(32, packs))


def from_dataset(prefix: str) -> Workload:
    from megalign.data.packed_dataset import read_metadata

    return from_metadata(read_metadata(prefix), prefix)


def mixture(parts: list[Workload], weights: list[float] | None = None) -> Workload:
    """Several datasets sampled by weight (data.weights; None: equally): the longest pack of any, the weighted mean
    of the rest."""
    if len(parts) == 1:
        return parts[0]
    weights = weights or [1.0] * len(parts)
    total = sum(weights)
    mean = lambda field: sum(w * getattr(p, field) for w, p in zip(weights, parts)) / total  # noqa: E731
    vocabs = [p.vocab_size for p in parts if p.vocab_size is not None]
    return Workload(seq_length=max(p.seq_length for p in parts), mean_pack_tokens=mean("mean_pack_tokens"),
                    mean_samples_per_pack=mean("mean_samples_per_pack"),
                    mean_square_tokens=mean("mean_square_tokens"),
                    source=" + ".join(p.source for p in parts), vocab_size=max(vocabs) if vocabs else None,
                    distinct_lengths=min(32, sum(p.distinct_lengths for p in parts)))
