"""Packing strategies: decide which samples share a pack (one micro-batch of at most `capacity` tokens).

A strategy only sees sample lengths and returns packs as lists of sample indices; every sample lands in
exactly one pack and no pack exceeds the capacity. Pack order is shuffled from the seed (except `none`, which
keeps input order); the training sampler reshuffles packs every epoch anyway.

  bfd       best-fit decreasing: longest first, each into the fullest pack it still fits
  ffs       first-fit shuffle: random order, each into the first (oldest) pack it fits
  next-fit  LongAlign's greedy: random order, open a new pack when the sample does not fit the current one
            (unlike the reference, the last partial pack is kept)
  sorted    LongAlign's sorted batching: by length, consecutive groups of at most `group_size` samples
  none      one sample per pack
"""

from __future__ import annotations

import math

import numpy as np
from sortedcontainers import SortedList

from megalign.errors import MegalignError, OptionError

STRATEGIES = ("bfd", "ffs", "next-fit", "sorted", "none")


def _check(lengths: np.ndarray, capacity: int) -> None:
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"sample lengths must be in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    order = np.argsort(-lengths, kind="stable")
    packs: list[list[int]] = []
    free = SortedList()  # (remaining capacity, pack index): the fullest pack that fits is a bisect away
    for i in order.tolist():
        n = int(lengths[i])
        pos = free.bisect_left((n, -1))
        if pos == len(free):
            packs.append([i])
            free.add((capacity - n, len(packs) - 1))
        else:
            remaining, p = free.pop(pos)
            packs[p].append(i)
            free.add((remaining - n, p))
    return packs


class _LeftmostFit:
    """A max-segment-tree over pack slots: the first pack with at least n free tokens in O(log packs)."""

    def __init__(self, slots: int):
        self.size = 1 << max(1, math.ceil(math.log2(max(slots, 1))))
        self.tree = [0] * (2 * self.size)

    def first_at_least(self, n: int) -> int | None:
        if self.tree[1] < n:
            return None
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= n else 2 * node + 1
        return node - self.size

    def set(self, slot: int, free: int) -> None:
        node = slot + self.size
        self.tree[node] = free
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2


def first_fit(lengths: np.ndarray, capacity: int, order: np.ndarray) -> list[list[int]]:
    packs: list[list[int]] = []
    free: list[int] = []
    index = _LeftmostFit(len(lengths))
    for i in order.tolist():
        n = int(lengths[i])
        p = index.first_at_least(n)
        if p is None:
            packs.append([])
            free.append(capacity)
            p = len(packs) - 1
        packs[p].append(i)
        free[p] -= n
        index.set(p, free[p])
    return packs


def next_fit(lengths: np.ndarray, capacity: int, order: np.ndarray, max_samples: int | None = None) -> list[list[int]]:
    packs: list[list[int]] = []
    used = capacity + 1  # forces a new pack for the first sample
    for i in order.tolist():
        n = int(lengths[i])
        if used + n > capacity or (max_samples is not None and len(packs[-1]) >= max_samples):
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return packs


def pack(lengths, capacity: int, strategy: str, seed: int, group_size: int = 8) -> list[list[int]]:
    """Group sample indices into packs of at most `capacity` tokens (see the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    _check(lengths, capacity)
    rng = np.random.default_rng(seed)
    if strategy == "bfd":
        packs = best_fit_decreasing(lengths, capacity)
    elif strategy == "ffs":
        packs = first_fit(lengths, capacity, rng.permutation(len(lengths)))
    elif strategy == "next-fit":
        packs = next_fit(lengths, capacity, rng.permutation(len(lengths)))
    elif strategy == "sorted":
        if group_size < 1:
            raise OptionError("group_size", f"must be at least 1, got {group_size}")
        packs = next_fit(lengths, capacity, np.argsort(lengths, kind="stable"), max_samples=group_size)
    elif strategy == "none":
        return [[i] for i in range(len(lengths))]
    else:
        raise MegalignError(f"unknown packing strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    return [packs[k] for k in rng.permutation(len(packs)).tolist()]


def lower_bound(lengths, capacity: int) -> int:
    """No packing can use fewer packs than ceil(total tokens / capacity)."""
    return -(-int(np.sum(lengths, dtype=np.int64)) // capacity)
