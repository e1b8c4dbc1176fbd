"""A shared prompt against a duplicated one: one preference group (a long prompt, M+1 short answers) through a
forward and backward pass of the logo objective, tokens/s and peak memory, same run.

    python bench/preference_prompt_sharing.py [--prompt 16384 --answers 3 --answer-length 512 --repeats 2]

The model is the LOGO example's (examples/logo-llama3-8b/logo.yaml: Llama-3-8B) cut down to what two CPU cores
run in a minute: its head size (128), GQA ratio (4 query heads per K/V head) and MLP ratio (3.5), at --hidden
1024 and --layers 2, with a vocabulary of 8,192. What sharing saves is per token (linear layers, norms, the
output layer) and per query-key pair (attention), so the ratio between the two modes does not depend on the
width; the seconds do.

  shared     data.prompt=shared: the prompt's tokens once, each answer a segment that attends to the prompt's
             keys and to itself (P + sum of the answers' tokens in the row)
  duplicate  data.prompt=duplicate: each answer after its own copy of the prompt ((M+1) x P + the answers)

Both give the same loss and gradients (tests/training/test_preference_objectives.py); the script checks the
losses agree. tokens/s counts the group's real tokens (P + the answers) per second of forward + backward, the
same numerator for both, so the ratio is the speed-up. Peak memory is torch's CPU allocator's live bytes at the
peak of the pass above those before it (bench/cpu_allocations.py): activations, logits and their gradients, and
the shared mode's gathered prompt keys and values (one copy per answer). Medians of --repeats, the modes
alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import code_state  # noqa: E402  (bench/, the script's folder, is on sys.path)

VOCAB = 8192


def group_pack(prompt: int, answers: int, answer_length: int, seed: int):
    import numpy as np

    from megalign.data.groups import CHOSEN, PROMPT, REJECTED
    from megalign.data.packed_dataset import Pack

    rng = np.random.default_rng(seed)
    lengths = [prompt] + [answer_length] * answers
    tokens = rng.integers(0, VOCAB, sum(lengths))
    mask = np.concatenate([np.zeros(prompt, np.uint8)] + [np.ones(answer_length, np.uint8)] * answers)
    roles = np.array([PROMPT, CHOSEN] + [REJECTED + j for j in range(answers - 1)])
    return Pack(tokens, mask, np.array(lengths), roles=roles)


def build_trainer(args, pack):
    from megalign.config import Config, updated
    from megalign.data.source import InMemoryPacks
    from megalign.training.trainer import Trainer

    hidden = args.hidden
    heads = hidden // 128
    model = {"num_layers": args.layers, "hidden_size": hidden, "ffn_hidden_size": int(hidden * 3.5),
             "num_attention_heads": heads, "num_query_groups": max(1, heads // 4), "vocab_size": VOCAB,
             "max_position_embeddings": 2 * (args.prompt + args.answers * args.answer_length),
             "rotary_base": 500000.0}
    cfg = updated(Config(), model=model, data={"prefetch": False},
                  training={"global_batch": 1, "objective": "logo", "beta": 10.0, "gamma": 3.0, "nll_weight": 0.1,
                            "warmup_fraction": 0},
                  run={"device": "cpu", "output_dir": str(Path(args.out) / "run"), "tensorboard": False})
    return Trainer(cfg, datasets=[InMemoryPacks([pack], vocab_size=VOCAB, name="group")])


def one_pass(trainer, mode: str, allocations) -> dict:
    import dataclasses

    builder = trainer.batches.replace(data=dataclasses.replace(trainer.cfg.data, prompt=mode))
    refs = trainer.sampler.packs_at(0, 1)
    batch = builder.build(refs[0])
    allocations.mark(f"{mode}-start-{id(batch)}")
    started = time.perf_counter()
    figures = trainer.forward_backward(refs, batches=builder)
    seconds = time.perf_counter() - started
    allocations.mark(f"{mode}-end-{id(batch)}")
    trainer.zero_grad()
    return {"seconds": seconds, "loss": figures["loss"], "row_tokens": int(batch.tokens.numel()),
            "marks": (f"{mode}-start-{id(batch)}", f"{mode}-end-{id(batch)}")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--answers", type=int, default=3, help="chosen + rejected answers (default 3: M = 2)")
    p.add_argument("--answer-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="/tmp/megalign-bench-preference")
    args = p.parse_args()

    import torch

    from cpu_allocations import Allocations
    from megalign.parallel.setup import shutdown

    torch.manual_seed(0)
    pack = group_pack(args.prompt, args.answers, args.answer_length, seed=0)
    real = int(pack.lengths.sum())
    trainer = build_trainer(args, pack)
    runs = {"shared": [], "duplicate": []}
    with Allocations() as allocations:
        for repeat in range(args.repeats):
            order = ("shared", "duplicate") if repeat % 2 == 0 else ("duplicate", "shared")
            for mode in order:
                runs[mode].append(one_pass(trainer, mode, allocations))
    shutdown()
    med = statistics.median
    print(f"{code_state()}; one group: prompt {args.prompt} + {args.answers} answers x {args.answer_length} = {real} "
          f"real tokens; model {args.layers} layers x hidden {args.hidden} (heads of 128, GQA 4, MLP 3.5x), vocab "
          f"{VOCAB}, fp32 CPU, objective logo; medians of {args.repeats}\n")
    print("| prompt | row tokens | forward+backward s | real tokens/s | peak memory GiB | loss |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for mode, rs in runs.items():
        seconds = med(r["seconds"] for r in rs)
        peak = med(allocations.peak(*r["marks"]) - allocations.level(r["marks"][0]) for r in rs) / 2**30
        rows[mode] = (seconds, peak)
        print(f"| {mode} | {rs[0]['row_tokens']:,} | {seconds:.2f} | {real / seconds:,.0f} | {peak:.2f} "
              f"| {rs[0]['loss']:.6f} |")
    (s_sec, s_mem), (d_sec, d_mem) = rows["shared"], rows["duplicate"]
    print(f"\nshared / duplicate: speed-up {d_sec / s_sec:.2f}x, memory {s_mem / d_mem:.2f}x; every run's seconds: "
          + "; ".join(f"{m} " + ", ".join(f"{r['seconds']:.2f}" for r in rs) for m, rs in runs.items()))
    losses = [r["loss"] for rs in runs.values() for r in rs]
    if max(losses) - min(losses) > 1e-4 * max(1.0, abs(losses[0])):
        print(f"warning: the losses differ: {losses}")


if __name__ == "__main__":
    main()
