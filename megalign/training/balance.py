"""Which data-parallel rank runs which packs of a global batch (data.balance), and in what order.

Packs hold the same number of tokens, but attention is quadratic per sample: for a 7B model a pack holding one
64k sample costs about 2.3x a pack of short chats (model/arithmetic.py). DP ranks meet at the gradient
reduction after their last micro-batch, so a step takes as long as its slowest rank. A pack's modelled cost is
its training FLOPs (step_flops: linear work per token plus attention over each sample's own length).

  none     consecutive shares in the sampler's order (what megatron's samplers do)
  compute  the packs split so that the slowest rank's modelled cost is as low as a greedy finds: longest
           processing time first (the costliest pack to the least-loaded rank that still has room), then
           swaps of one pack between the slowest rank and another while that lowers the pair's maximum; never
           worse than `none` (the better of the two is kept). With two packs per rank this is the optimum
           (costliest with cheapest); bench/dp_balance.py measures the rest

Every rank runs the same number of micro-batches (global_batch / dp: megatron's schedule and the gradient
accumulation need it). The assignment is a pure function of the global batch's references and their costs
(themselves a function of the data and the model config); ties go to the earlier pack of the global batch (the
sampler's seeded order) and the lower rank. So every rank computes the same one without talking, and a resumed
run, whose sampler gives the same references again, computes it again. The global batch is the same set of
packs whichever rank runs them, so the loss and the gradients do not change (only the order of the sums: fp32
gradient accumulation may round differently).

The model counts FLOPs, not seconds: recomputation is left out (full recomputation adds the same share to every
pack), and attention kernels reach fewer FLOP/s than the matrix multiplies, so long packs are somewhat slower
than modelled.

Order within a rank (compute): the cheapest pack first, then the others by decreasing cost. Under pipeline
parallelism the first micro-batch's forwards fill the pipeline while the other stages wait, and 1F1B stalls
where neighbouring micro-batches differ: a cheap first pack shortens the fill and a sorted rest keeps neighbours
alike, ending on cheap packs for a short drain (bench/dp_balance.py measures the orders on a modelled 1F1B).
Memory does not decide it: packs hold the same tokens, so their activations are the same size.

`dp_imbalance` (logged every step, under `none` too) is the slowest rank's modelled cost over the mean.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megalign.config import BALANCE_MODES, ModelConfig
from megalign.data.sampler import PackRef
from megalign.data.source import PackSource
from megalign.model.arithmetic import step_flops


def pack_cost(model: ModelConfig, sample_lengths) -> float:
    """Modelled training FLOPs of one pack with these sample lengths (forward + backward)."""
    return step_flops(model, model.padded_vocab_size, [int(n) for n in sample_lengths])


# -- shares of a list of costs: lists of indices, one per rank ---------------------------------------------------
def consecutive_shares(n: int, dp: int) -> list[list[int]]:
    per_rank = _per_rank(n, dp)
    return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(dp)]


def balanced_shares(costs: Sequence[float], dp: int) -> list[list[int]]:
    """Indices of `costs` per rank, len(costs) / dp each, the slowest rank's total as low as the greedy finds; each
    rank's indices in run order (run_order)."""
    costs = np.asarray(costs, dtype=np.float64)
    per_rank = _per_rank(len(costs), dp)
    owner = _longest_first(costs, dp, per_rank)
    _swap_down_the_slowest(costs, owner, dp)
    shares = [np.flatnonzero(owner == r).tolist() for r in range(dp)]
    consecutive = consecutive_shares(len(costs), dp)
    if _slowest(costs, consecutive) < _slowest(costs, shares):  # the greedy is a heuristic: never lose to `none`
        shares = consecutive
    return [run_order(s, costs) for s in shares]


def run_order(indices: Sequence[int], costs: Sequence[float]) -> list[int]:
    """The cheapest first, then by decreasing cost (ties: the earlier index first); see the module's docstring."""
    by_cost = sorted(indices, key=lambda i: (-costs[i], i))
    return by_cost[-1:] + by_cost[:-1]


def imbalance(costs: Sequence[float], shares: Sequence[Sequence[int]]) -> float:
    """The slowest rank's cost over the mean rank's (1.0: perfectly even)."""
    loads = [math.fsum(costs[i] for i in s) for s in shares]
    mean = math.fsum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _per_rank(n: int, dp: int) -> int:
    if n % dp:
        raise ValueError(f"{n} packs do not split over {dp} data-parallel ranks")
    return n // dp


def _slowest(costs: np.ndarray, shares: list[list[int]]) -> float:
    return max(math.fsum(costs[i] for i in s) for s in shares)


def _longest_first(costs: np.ndarray, dp: int, per_rank: int) -> np.ndarray:
    """LPT with room: by decreasing cost (ties: the earlier pack), each to the least-loaded rank (ties: the lowest)
    that has fewer than per_rank packs. Returns each pack's rank."""
    owner = np.full(len(costs), -1, dtype=np.int64)
    ranks = [(0.0, r) for r in range(dp)]  # (load, rank) of the ranks with room
    counts = [0] * dp
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(ranks)
        owner[i] = r
        counts[r] += 1
        if counts[r] < per_rank:
            heapq.heappush(ranks, (load + float(costs[i]), r))
    return owner


def _swap_down_the_slowest(costs: np.ndarray, owner: np.ndarray, dp: int, max_swaps: int | None = None) -> None:
    """While some swap of a pack of the slowest rank with a cheaper pack of another rank lowers the larger of the
    two ranks' loads, make the one that lowers it most. Each swap strictly lowers the sum of squared loads, so
    this ends; max_swaps bounds it anyway."""
    loads = np.zeros(dp)
    np.add.at(loads, owner, costs)
    for _ in range(max_swaps if max_swaps is not None else 4 * len(costs)):
        top = int(np.argmax(loads))
        mine, others = np.flatnonzero(owner == top), np.flatnonzero(owner != top)
        if not len(mine) or not len(others):
            return
        moved = costs[mine][:, None] - costs[others][None, :]  # load leaving `top` per (mine, other) swap
        larger = np.maximum(loads[top] - moved, loads[owner[others]][None, :] + moved)
        a, b = np.unravel_index(int(np.argmin(larger)), larger.shape)
        if not larger[a, b] < loads[top] * (1 - 1e-12):  # no swap helps (the margin: rounding is no progress)
            return
        i, j = int(mine[a]), int(others[b])
        other = int(owner[j])
        loads[top] -= moved[a, b]
        loads[other] += moved[a, b]
        owner[i], owner[j] = other, top


# -- the trainer's view: pack references ------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    shares: list[list[PackRef]]  # rank r's micro-batches, in run order
    imbalance: float  # the slowest rank's modelled cost over the mean


class DataParallelBalance:
    """data.balance for a run's model: `assign(refs, datasets, dp)` splits a global batch over the DP ranks.

    Pack costs are cached per dataset and pack (a pack's cost does not change with its epoch), and the last
    assignment is kept, so the trainer can ask for the step's imbalance after running it without a second split.
    """

    def __init__(self, model: ModelConfig, mode: str):
        if mode not in BALANCE_MODES:
            raise ValueError(f"data.balance {mode!r}; valid: {', '.join(BALANCE_MODES)}")
        self.model = model
        self.mode = mode
        self._costs: dict[int, tuple[PackSource, dict[int, float]]] = {}  # id(dataset) -> (dataset, pack -> cost)
        self._last: tuple[tuple, Assignment] | None = None

    def costs(self, refs: Sequence[PackRef], datasets: Sequence[PackSource]) -> list[float]:
        out = []
        for r in refs:
            source = datasets[r.dataset]
            _, costs = self._costs.setdefault(id(source), (source, {}))  # held: its id stays its own
            if r.pack not in costs:
                costs[r.pack] = pack_cost(self.model, source.pack_sample_lengths(r.pack))
            out.append(costs[r.pack])
        return out

    def assign(self, refs: Sequence[PackRef], datasets: Sequence[PackSource], dp: int) -> Assignment:
        key = (tuple(refs), tuple(id(d) for d in datasets), dp)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        costs = self.costs(refs, datasets)
        if self.mode == "compute":
            shares = balanced_shares(costs, dp)
        else:
            shares = consecutive_shares(len(refs), dp)
        done = Assignment([[refs[i] for i in s] for s in shares], imbalance(costs, shares))
        self._last = (key, done)
        return done
