"""Modelled data-parallel imbalance (slowest rank / mean) on a LongAlign-like mix at 64k, data.balance none vs
compute, for a 7B Llama-2; and the modelled 1F1B pipeline time of each order of a rank's micro-batches.

The data is the mix of bench/packing.py, lengths drawn from a fixed seed, no tokenizer involved:
  long   --long samples (default 10,000, as LongAlign-10k), log-uniform in [8192, 65536]
  short  --short ShareGPT-like chats (default 60,000), lognormal with median --short-median (300) and sigma
         --short-sigma (1.0), clipped to [16, 8192]
packed by megalign's bfd at --capacity 65536. A pack's cost is megalign.training.balance.pack_cost (training FLOPs:
linear per token + attention quadratic per sample) for the --preset model (default llama2-7b). The sampler
(megalign.data.sampler.PackSampler, seed 0) draws --steps global batches of `packs per rank x DP` packs; each is
split by megalign.training.balance (consecutive shares for none, balanced_shares for compute), and the table gives
the median and the worst dp_imbalance over the steps.

The pipeline table models megatron's non-interleaved 1F1B: every stage takes cost/PP for a micro-batch's forward
and twice that for its backward, no communication; it gives the step time over the busy time (1.0: no bubble;
identical micro-batches give 1 + (PP-1)/M), median over the DP=8 compute shares of every step.

  python bench/dp_balance.py [--steps 200] [--short-median 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megalign.config import Config, ModelConfig, resolve  # noqa: E402
from megalign.data import packing  # noqa: E402
from megalign.data.sampler import PackSampler  # noqa: E402
from megalign.model.arithmetic import dense_flops_per_token  # noqa: E402
from megalign.model.presets import preset  # noqa: E402
from megalign.training import balance  # noqa: E402
from common import code_state  # noqa: E402  (bench/, the script's folder, is on sys.path)
from packing import lengths_mix  # noqa: E402  (bench/packing.py: the same LongAlign-like mix)

DP_SIZES = (8, 16, 64)
PACKS_PER_RANK = (1, 2, 4, 12)  # 12: LongAlign's recipe, ~96 per step on 8 GPUs
ORDERS = ("sampler", "decreasing", "cheapest, then decreasing")


def model_config(name: str) -> ModelConfig:
    cfg = Config(model=dataclasses.replace(ModelConfig(), **preset(name)))
    return resolve(cfg).model


def pack_costs(lengths: np.ndarray, packs: list[list[int]], model: ModelConfig) -> np.ndarray:
    return np.array([balance.pack_cost(model, lengths[p]) for p in packs])


def imbalances(costs: np.ndarray, dp: int, per_rank: int, steps: int) -> dict[str, list[float]]:
    sampler = PackSampler([len(costs)], None, dp * per_rank, dp, seed=0)
    found: dict[str, list[float]] = {"none": [], "compute": []}
    for _ in range(steps):
        step_costs = costs[[r.pack for r in sampler.next_global_batch()]]
        found["none"].append(balance.imbalance(step_costs, balance.consecutive_shares(len(step_costs), dp)))
        found["compute"].append(balance.imbalance(step_costs, balance.balanced_shares(step_costs, dp)))
    return found


def one_f_one_b(costs: list[float], pp: int) -> float:
    """Modelled time of megatron's non-interleaved 1F1B over micro-batches of these costs, in cost units."""
    m = len(costs)
    forward = [c / pp for c in costs]
    program = []  # per stage: its ops in megatron's order, ("F" | "B", micro-batch)
    for s in range(pp):
        warmup = min(pp - s - 1, m)
        ops = [("F", j) for j in range(warmup)]
        for i in range(m - warmup):
            ops += [("F", warmup + i), ("B", i)]
        program.append(ops + [("B", j) for j in range(m - warmup, m)])
    finished: dict[tuple[str, int, int], float] = {}
    clock, at = [0.0] * pp, [0] * pp
    while any(at[s] < len(program[s]) for s in range(pp)):
        for s in range(pp):
            while at[s] < len(program[s]):
                kind, j = program[s][at[s]]
                needs = (("F", s - 1, j) if s else None) if kind == "F" else (("B", s + 1, j) if s < pp - 1
                                                                               else ("F", s, j))
                if needs is not None and needs not in finished:
                    break
                start = max(clock[s], finished[needs] if needs else 0.0)
                clock[s] = start + forward[j] * (1 if kind == "F" else 2)
                finished[(kind, s, j)] = clock[s]
                at[s] += 1
    return max(clock)


def ordered(share: list[int], costs: np.ndarray, order: str) -> list[float]:
    if order == "sampler":
        share = sorted(share)
    elif order == "decreasing":
        share = sorted(share, key=lambda i: (-costs[i], i))
    else:
        share = balance.run_order(share, costs)
    return [float(costs[i]) for i in share]


def pipeline_overheads(costs: np.ndarray, per_rank: int, pp: int, steps: int, dp: int = 8) -> dict[str, float]:
    sampler = PackSampler([len(costs)], None, dp * per_rank, dp, seed=0)
    found: dict[str, list[float]] = {o: [] for o in ORDERS}
    for _ in range(steps):
        step_costs = costs[[r.pack for r in sampler.next_global_batch()]]
        for share in balance.balanced_shares(step_costs, dp):
            busy = 3 * float(step_costs[share].sum()) / pp
            for order in ORDERS:
                found[order].append(one_f_one_b(ordered(share, step_costs, order), pp) / busy)
    return {o: statistics.median(v) for o, v in found.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--long", type=int, default=10_000, help="long samples, log-uniform in [8192, capacity]")
    p.add_argument("--short", type=int, default=60_000, help="short chat samples, lognormal")
    p.add_argument("--short-median", type=float, default=300.0, help="median short length in tokens (default 300)")
    p.add_argument("--short-sigma", type=float, default=1.0, help="lognormal sigma of short lengths (default 1.0)")
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--preset", default="llama2-7b", help="model preset for the costs (megalign/model/presets.py)")
    p.add_argument("--steps", type=int, default=200, help="global batches per configuration (default 200)")
    p.add_argument("--pipeline-steps", type=int, default=25, help="global batches for the pipeline table")
    args = p.parse_args()

    started = time.perf_counter()
    model = model_config(args.preset)
    lengths = lengths_mix(0, args.long, args.short, args.capacity, args.short_median, args.short_sigma)
    packs = packing.pack(lengths, args.capacity, "bfd", seed=0)
    costs = pack_costs(lengths, packs, model)
    linear = 3 * args.capacity * dense_flops_per_token(model, model.padded_vocab_size)  # a full pack, no attention
    spread = "/".join(f"{q:.2f}" for q in np.percentile(costs / linear, [5, 50, 95, 100]))
    print(f"{code_state()}; {len(lengths):,} samples ({args.long:,} long, {args.short:,} short, short median "
          f"{args.short_median:g}), bfd at {args.capacity}: {len(packs):,} packs; {args.preset} pack cost "
          f"5%/median/95%/max {spread} x a full pack's linear work; {args.steps} steps per row\n")

    print("| DP | packs per rank | global batch | none: median | none: max | compute: median | compute: max |")
    print("|---|---|---|---|---|---|---|")
    for dp in DP_SIZES:
        for per_rank in PACKS_PER_RANK:
            found = imbalances(costs, dp, per_rank, args.steps)
            none, compute = found["none"], found["compute"]
            print(f"| {dp} | {per_rank} | {dp * per_rank} | {statistics.median(none):.3f} | {max(none):.3f} "
                  f"| **{statistics.median(compute):.3f}** | {max(compute):.3f} |")

    print(f"\n1F1B step time / busy time, DP=8 compute shares, median over {args.pipeline_steps} steps x 8 ranks:\n")
    print("| PP | micro-batches | identical micro-batches | " + " | ".join(ORDERS) + " |")
    print("|---|---|---|" + "---|" * len(ORDERS))
    for pp in (4, 8):
        for per_rank in (12, 32):
            found = pipeline_overheads(costs, per_rank, pp, args.pipeline_steps)
            print(f"| {pp} | {per_rank} | {1 + (pp - 1) / per_rank:.3f} | "
                  + " | ".join(f"{found[o]:.3f}" for o in ORDERS) + " |")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
