"""Packs used, packing efficiency and packing time of each strategy on a LongAlign-like length mix.

Sample lengths (tokens) are drawn from a fixed seed, no tokenizer involved:
  long   --long samples (default 10,000, as LongAlign-10k), log-uniform in [8192, 65536]
  short  --short ShareGPT-like chats (default 60,000), lognormal with median --short-median (300) and sigma
         --short-sigma (1.0), clipped to [16, 8192]
Each strategy of megalign.data.packing.pack (bfd, ffs, next-fit, sorted with the default group size 8 and with
32) packs them at --capacity 65536 (one 64k micro-batch). Reported per strategy: packs, efficiency =
tokens / (packs * capacity), packs over the lower bound ceil(tokens / capacity) in %, and the wall seconds of the
pack() call. Every result is checked: each sample in exactly one pack, no pack over capacity.

The first table is seed 0; the second is the median over --seeds seeds (0, 1, ...), with the worst seed's
overshoot beside it.

  /work/venv/bin/python bench/packing.py [--long 10000 --short 60000 --seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megalign.data import packing  # noqa: E402
from common import code_state  # noqa: E402  (bench/, the script's folder, is on sys.path)


STRATEGIES = [("bfd", 8), ("ffs", 8), ("next-fit", 8), ("sorted", 8), ("sorted", 32)]  # (strategy, group size)


def lengths_mix(seed: int, n_long: int, n_short: int, capacity: int,
                short_median: float, short_sigma: float) -> np.ndarray:
    """Long samples log-uniform in [8192, capacity] plus short chats lognormal around short_median, shuffled."""
    rng = np.random.default_rng(seed)
    long = np.exp(rng.uniform(np.log(8192), np.log(capacity), n_long))
    short = np.clip(rng.lognormal(np.log(short_median), short_sigma, n_short), 16, 8192)
    lengths = np.concatenate([long, short]).astype(np.int64)
    return lengths[rng.permutation(len(lengths))]


def check(packs: list[list[int]], lengths: np.ndarray, capacity: int) -> None:
    placed = np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in packs]))
    assert np.array_equal(placed, np.arange(len(lengths))), "a sample is missing or packed twice"
    assert max(int(lengths[p].sum()) for p in packs) <= capacity, "a pack is over capacity"


def run_strategy(lengths: np.ndarray, capacity: int, strategy: str, group_size: int, seed: int) -> dict:
    started = time.perf_counter()
    packs = packing.pack(lengths, capacity, strategy, seed, group_size)
    seconds = time.perf_counter() - started
    check(packs, lengths, capacity)
    bound = packing.lower_bound(lengths, capacity)
    return {"packs": len(packs), "bound": bound, "over": 100 * (len(packs) - bound) / bound,
            "efficiency": int(lengths.sum()) / (len(packs) * capacity), "seconds": seconds}


def name(strategy: str, group_size: int) -> str:
    return f"sorted (group {group_size})" if strategy == "sorted" else strategy


def seed_table(results: dict, lengths: np.ndarray) -> str:
    lines = ["| strategy | packs | lower bound | over bound | efficiency | pack time s |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        lines.append(f"| {name(*key)} | {r['packs']:,} | {r['bound']:,} | {r['over']:.2f}% | {r['efficiency']:.2%} "
                     f"| {r['seconds']:.2f} |")
    return "\n".join(lines)


def median_table(per_seed: list[dict]) -> str:
    med = statistics.median
    lines = ["| strategy | packs | lower bound | over bound (worst seed) | efficiency | pack time s |",
             "|---|---|---|---|---|---|"]
    for key in per_seed[0]:
        rs = [s[key] for s in per_seed]
        lines.append(f"| {name(*key)} | {med(r['packs'] for r in rs):,.0f} | {med(r['bound'] for r in rs):,.0f} "
                     f"| {med(r['over'] for r in rs):.2f}% ({max(r['over'] for r in rs):.2f}%) "
                     f"| {med(r['efficiency'] for r in rs):.2%} | {med(r['seconds'] for r in rs):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--long", type=int, default=10_000, help="long samples, log-uniform in [8192, capacity]")
    p.add_argument("--short", type=int, default=60_000, help="short chat samples, lognormal")
    p.add_argument("--short-median", type=float, default=300.0, help="median short length in tokens (default 300)")
    p.add_argument("--short-sigma", type=float, default=1.0, help="lognormal sigma of short lengths (default 1.0)")
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for the median table (default 5)")
    args = p.parse_args()

    per_seed = []
    for seed in range(args.seeds):
        lengths = lengths_mix(seed, args.long, args.short, args.capacity, args.short_median, args.short_sigma)
        per_seed.append({(s, g): run_strategy(lengths, args.capacity, s, g, seed) for s, g in STRATEGIES})
        if seed == 0:
            print(f"{code_state()}; seed 0: {len(lengths):,} samples ({args.long:,} long, {args.short:,} short; "
                  f"short median "
                  f"{int(np.median(lengths[lengths < 8192]))} tokens), {int(lengths.sum()):,} tokens, "
                  f"capacity {args.capacity}\n")
            print(seed_table(per_seed[0], lengths))
    print(f"\nmedian over seeds 0..{args.seeds - 1}:\n")
    print(median_table(per_seed))


if __name__ == "__main__":
    main()
