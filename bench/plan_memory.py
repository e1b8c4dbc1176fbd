"""The planner's memory model (megalign/plan/memory.py) against measured memory of real training steps on CPU:
the example model (examples/tiny.yaml) and a 0.2B Llama-shaped model, at TP=1, TP=2 (with and without sequence
parallelism), PP=2, CP=2 and under each recompute mode; launched one after the other (torchrun, gloo, CPU mode,
fp32, sdpa attention), each on packs of one sample of a fixed length (or of four samples: tiny-mixed).

What is measured, per rank: the live bytes of torch's CPU allocator (bench/cpu_allocations.py: the profiler's
memory events, not the resident memory), from before the Trainer is built through two training steps:

  model state   live after step 1, minus before the Trainer: weights, DDP's gradient buffers, the optimizer's
                state (created at its first step), persistent workspaces
  step peak     the most alive during step 2, minus the level before it: activations, logits, transients
  drift         live after step 2 minus after step 1 (0 when the state is steady)

and what the planner predicts for the same quantities at the rank's pipeline stage (memory.estimate_stage with the
CPU mode's precision, fp32, and attention, "cpu").

  python bench/plan_memory.py --out results.json          # the default layouts, ~40 minutes on 2 cores
  python bench/plan_memory.py --models tiny --layouts "tp2 sp selective,pp2 4mb,tp2 cp2,tp2 pp2"   # ~5 min
  python bench/plan_memory.py --models tiny-mixed --layouts "tp1,cp2,tp2 cp2"                     # ~3 min
  python bench/plan_memory.py --measured results.json      # those measurements against the current planner
  python bench/plan_memory.py --device cuda --models 0.2b,1b --layouts "tp1,tp1 selective,tp1 full"  # one GPU

On a GPU (--device cuda: bf16, model.attention_backend auto) the counters are the CUDA caching allocator's
(memory_allocated, max_memory_allocated), the same quantities without the profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

from common import code_state  # bench/, the script's folder, is on sys.path

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (overrides of examples/tiny.yaml, the sample lengths of every pack). The example's vocabulary is its
# tokenizer's (tools/make_example_data.py: 2,000, padded to 2,048: the padded-vocabulary terms are exercised).
MODELS = {
    "tiny": (["model.vocab_size=2000"], [4096]),
    "0.2b": (["model.num_layers=12", "model.hidden_size=1024", "model.ffn_hidden_size=2816",
              "model.num_attention_heads=16", "model.num_query_groups=4", "model.vocab_size=32000"], [2048]),
    "tiny-mixed": (["model.vocab_size=2000"], [1500, 1000, 900, 696]),  # packs of four samples
    # for a GPU (--device cuda): Llama-3.2-1B's shape (tied embeddings, vocabulary 128,256) at 16k
    "1b": (["model.num_layers=16", "model.hidden_size=2048", "model.ffn_hidden_size=8192",
            "model.num_attention_heads=32", "model.num_query_groups=8", "model.vocab_size=128256",
            "model.tie_embeddings=true"], [16384]),
}
# name -> (processes, overrides, packs per step); the ones after DEFAULT_LAYOUTS were kept out of the model's
# development (checks on layouts it was not fitted on)
DEFAULT_LAYOUTS = ["tp1", "tp1 selective", "tp1 full", "tp2", "tp2 sp", "tp2 sp full", "pp2", "cp2",
                   "cp2 selective"]
LAYOUTS = {
    "tp1": (1, [], 1),
    "tp1 selective": (1, ["model.recompute=selective"], 1),
    "tp1 full": (1, ["model.recompute=full"], 1),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"], 1),
    "tp2 sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], 1),
    "tp2 sp full": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full"], 1),
    "pp2": (2, ["parallel.pp=2"], 2),  # two micro-batches: stage 0 holds both in flight under 1F1B
    "cp2": (2, ["parallel.cp=2"], 1),
    "cp2 selective": (2, ["parallel.cp=2", "model.recompute=selective"], 1),
    "tp2 sp selective": (2, ["parallel.tp=2", "model.recompute=selective"], 1),
    "pp2 4mb": (2, ["parallel.pp=2"], 4),  # four micro-batches: stage 0 still holds two
    "tp2 cp2": (4, ["parallel.tp=2", "parallel.cp=2"], 1),
    "tp2 pp2": (4, ["parallel.tp=2", "parallel.pp=2"], 2),
}


def config(model: str, layout: str, workdir: str, device: str = "cpu", backend: str = "sdpa"):
    from megalign.config import load_config

    overrides, lengths = MODELS[model]
    _, parallel, packs = LAYOUTS[layout]
    return load_config(os.path.join(ROOT, "examples", "tiny.yaml"), [
        *overrides, *parallel, f"run.device={device}", f"model.attention_backend={backend}",
        f"training.global_batch={packs}",
        f"model.max_position_embeddings={max(sum(lengths), 4096)}", "training.warmup_fraction=0",
        "checkpoint.save_at_end=false", "checkpoint.resume=false", f"run.output_dir={workdir}/run"])


def packs(lengths: list[int], vocab: int, count: int):
    """`count` packs of samples of `lengths` random tokens, every token a target."""
    import numpy as np

    from megalign.data.packed_dataset import Pack
    from megalign.data.source import InMemoryPacks

    rng = np.random.default_rng(0)
    tokens = sum(lengths)
    return InMemoryPacks([Pack(rng.integers(0, vocab, tokens), np.ones(tokens, np.uint8), np.array(lengths))
                          for _ in range(count)], vocab_size=vocab)


def workload(lengths: list[int]):
    """The planner's view of those packs."""
    from megalign.plan.workload import Workload

    return Workload(seq_length=sum(lengths), mean_pack_tokens=float(sum(lengths)),
                    mean_samples_per_pack=float(len(lengths)), mean_square_tokens=float(sum(n * n for n in lengths)),
                    source=f"packs of {lengths}")


def worker(args) -> None:
    import torch.distributed as dist

    from megalign.config import validate
    from megalign.parallel.launcher import world_size_from_env
    from megalign.parallel.setup import shutdown
    from megalign.training.trainer import Trainer

    cfg = config(args.model, args.layout, args.workdir, args.device, args.backend)
    validate(cfg, world_size_from_env(), with_data=False)
    data = packs(MODELS[args.model][1], cfg.model.vocab_size, 4 * cfg.training.global_batch)
    measure = measure_cuda if args.device == "cuda" else measure_cpu
    trainer, record = measure(lambda: Trainer(cfg, datasets=[data]))
    layout = trainer.layout
    record.update(rank=layout.rank, stage=layout.pp_rank, attention_backend=trainer.attention_backend)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    shutdown()


def measure_cpu(build):
    """Model state, step peak and drift (see the module docstring) from torch's CPU allocator."""
    from cpu_allocations import Allocations

    with Allocations() as allocations:
        allocations.mark("start")
        trainer = build()
        trainer.train_step()  # the optimizer's state exists after its first step
        allocations.mark("steady")
        trainer.train_step()
        allocations.mark("end")
    return trainer, {"model_state": allocations.level("steady") - allocations.level("start"),
                     "step_peak": allocations.peak("steady", "end") - allocations.level("steady"),
                     "drift": allocations.level("end") - allocations.level("steady")}


def measure_cuda(build):
    """The same from the CUDA caching allocator's counters (bytes of live tensors, its peak since a reset)."""
    import torch

    start = torch.cuda.memory_allocated()
    trainer = build()
    trainer.train_step()
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.train_step()
    torch.cuda.synchronize()
    return trainer, {"model_state": steady - start, "step_peak": torch.cuda.max_memory_allocated() - steady,
                     "drift": torch.cuda.memory_allocated() - steady}


def launch(model: str, layout: str, workdir: str, device: str, backend: str) -> list[dict]:
    processes = LAYOUTS[layout][0]
    out = os.path.join(workdir, "ranks.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__,
           "--worker", "--model", model, "--layout", layout, "--workdir", workdir, "--out", out,
           "--device", device, "--backend", backend]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{model} {layout} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def prediction(model: str, layout: str, stage: int, device: str = "cpu", backend: str = "sdpa") -> dict:
    """The planner's estimate for this run's rank on pipeline stage `stage` (`backend`: the one the run used)."""
    from megalign.config import resolve
    from megalign.plan.layout import Layout
    from megalign.plan.memory import BF16, FP32, attention_kind, estimate_stage

    with tempfile.TemporaryDirectory() as workdir:
        cfg = resolve(config(model, layout, workdir))
    p = cfg.parallel
    processes = LAYOUTS[layout][0]
    plan_layout = Layout(p.tp, p.pp, p.cp, processes // (p.tp * p.pp * p.cp), p.sp, cfg.model.recompute,
                         p.distributed_optimizer)
    micro_batches = cfg.training.global_batch // plan_layout.dp
    precision = FP32 if device == "cpu" else BF16
    estimate = estimate_stage(cfg.model, plan_layout, workload(MODELS[model][1]), precision,
                              attention_kind(backend, device), micro_batches, stage)
    return {"model_state": estimate.model_state, "step_peak": estimate.step, **estimate.terms()}


def rows(model: str, layout: str, ranks: list[dict], device: str) -> list[dict]:
    """One row per pipeline stage: its rank with the most measured memory, against the stage's prediction."""
    found = []
    for stage in sorted({r["stage"] for r in ranks}):
        worst = max((r for r in ranks if r["stage"] == stage), key=lambda r: r["model_state"] + r["step_peak"])
        row = {"model": model, "layout": layout, "stage": stage, "rank": worst["rank"], "device": device,
               "attention_backend": worst["attention_backend"],
               "measured": {k: worst[k] for k in ("model_state", "step_peak", "drift")}}
        found.append(repredicted(row))
    return found


def repredicted(row: dict) -> dict:
    device, backend = row.get("device", "cpu"), row.get("attention_backend", "sdpa")
    return {**row, "predicted": prediction(row["model"], row["layout"], row["stage"], device, backend)}


def markdown(results: list[dict]) -> str:
    mib = 2**20
    lines = ["| model | layout | rank (stage) | model state: measured / predicted | ratio | step peak: measured / "
             "predicted | ratio | total: measured / predicted | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, p = r["measured"], r["predicted"]
        total_m, total_p = m["model_state"] + m["step_peak"], p["model_state"] + p["step_peak"]
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['rank']} ({r['stage']}) | {m['model_state'] / mib:,.1f} / "
            f"{p['model_state'] / mib:,.1f} MiB | {p['model_state'] / m['model_state']:.3f} | "
            f"{m['step_peak'] / mib:,.1f} / {p['step_peak'] / mib:,.1f} MiB | {p['step_peak'] / m['step_peak']:.3f} | "
            f"{total_m / mib:,.1f} / {total_p / mib:,.1f} MiB | {total_p / total_m:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,0.2b", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--measured", help="a previous run's JSON (--out): predict again, measure nothing")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: bf16 on GPUs, the CUDA allocator's counters (one GPU per process)")
    parser.add_argument("--backend", default=None, help="model.attention_backend (default: sdpa on CPU, auto on GPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backend = args.backend or ("sdpa" if args.device == "cpu" else "auto")
    if args.worker:
        return worker(args)
    print(code_state(), flush=True)
    if args.measured:
        with open(args.measured) as f:
            results = [repredicted(r) for r in json.load(f)]
        print(markdown(results))
        return
    results = []
    for model in args.models.split(","):
        for layout in args.layouts.split(","):
            with tempfile.TemporaryDirectory() as workdir:
                ranks = launch(model, layout, workdir, args.device, args.backend)
            found = rows(model, layout, ranks, args.device)
            results += found
            for r in found:
                drift = r["measured"]["drift"] / 2**20
                print(f"{model} {layout} rank {r['rank']}: " + markdown([r]).splitlines()[-1]
                      + (f" drift {drift:.1f} MiB" if abs(drift) > 0.05 else ""), flush=True)
    print(markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
