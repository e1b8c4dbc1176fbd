"""Which packs each optimizer step uses, and which data-parallel rank gets which.

The stream of packs is a pure function of (seed, position): dataset d's packs are shuffled afresh every epoch
of d (seeded by seed and epoch), and several datasets are interleaved by weight with megatron's blending rule
(each position goes to the dataset furthest below its share so far). So the sampler's whole state is the
number of packs consumed, a checkpoint restores it exactly, and every rank can see the whole global batch (to
count its sequences) without communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackRef:
    dataset: int
    pack: int
    epoch: int = 0  # the epoch of `dataset` this use of the pack belongs to (per-epoch draws, e.g. SkipAlign)


class PackSampler:
    def __init__(self, num_packs: list[int], weights: list[float] | None, global_batch: int, dp_size: int, seed: int):
        if any(n == 0 for n in num_packs):
            raise ValueError("every dataset needs at least one pack")
        self.num_packs = list(num_packs)
        w = np.asarray(weights if weights is not None else [1.0] * len(num_packs), dtype=np.float64)
        self.weights = w / w.sum()
        self.global_batch = global_batch
        self.dp_size = dp_size
        self.seed = seed
        self.consumed = 0  # packs consumed so far: the whole state
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._chosen: list[int] = []  # blending, cached as it is extended (a pure function of weights)
        self._within: list[int] = []
        self._taken = np.zeros(len(self.weights))

    # -- the stream ---------------------------------------------------------------------------------------
    def _dataset_of(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset of stream positions [start, start+count) and each one's index within its dataset."""
        if len(self.num_packs) == 1:
            return np.zeros(count, dtype=np.int64), np.arange(start, start + count)
        while len(self._chosen) < start + count:  # megatron's blending: the largest deficit goes next
            position = len(self._chosen)
            d = int(np.argmax(self.weights * (position + 1) - self._taken))
            self._chosen.append(d)
            self._within.append(int(self._taken[d]))
            self._taken[d] += 1
        return (np.asarray(self._chosen[start:start + count], dtype=np.int64),
                np.asarray(self._within[start:start + count], dtype=np.int64))

    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        key = (dataset, epoch)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, dataset, epoch])
            self._orders = {k: v for k, v in self._orders.items() if k[0] != dataset or k[1] >= epoch - 1}
            self._orders[key] = rng.permutation(self.num_packs[dataset])
        return self._orders[key]

    def packs_at(self, start: int, count: int) -> list[PackRef]:
        datasets, within = self._dataset_of(start, count)
        refs = []
        for d, j in zip(datasets.tolist(), within.tolist()):
            epoch, offset = divmod(j, self.num_packs[d])
            refs.append(PackRef(d, int(self._order(d, epoch)[offset]), int(epoch)))
        return refs

    # -- steps ------------------------------------------------------------------------------------------
    def next_global_batch(self) -> list[PackRef]:
        """The packs of the next optimizer step, in order; rank r's micro-batches are `rank_share(batch, r)`."""
        batch = self.packs_at(self.consumed, self.global_batch)
        self.consumed += self.global_batch
        return batch

    def rank_share(self, batch: list[PackRef], dp_rank: int) -> list[PackRef]:
        return dp_share(batch, self.dp_size, dp_rank)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_packs": self.num_packs,
                "weights": self.weights.tolist(), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["num_packs"] != self.num_packs or state["seed"] != self.seed:
            raise ValueError("the checkpoint's sampler was built on other data or another seed")
        self.consumed = int(state["consumed"])


def dp_share(refs, dp_size: int, dp_rank: int) -> list:
    """Data-parallel rank `dp_rank`'s consecutive share of `refs` (a multiple of dp_size of them)."""
    if len(refs) % dp_size:
        raise ValueError(f"{len(refs)} packs do not split over {dp_size} data-parallel ranks")
    per_rank = len(refs) // dp_size
    return list(refs[dp_rank * per_rank:(dp_rank + 1) * per_rank])
