"""The host's share of a training step, with the next step's micro-batches built in place or prefetched
(data.prefetch), same run, A B A B.

    python bench/host_prefetch.py [--pack-length 8192] [--steps 6] [--rounds 2]

One process, the example model (examples/tiny.yaml) on the CPU, packs of --pack-length tokens holding many
samples (lognormal lengths, median 300 tokens, as chats) with SkipAlign positions: the host work per pack is
reading it, drawing its positions and making the loss inputs. `host_seconds` is what a step waited for its
micro-batches (Trainer.micro_batches: building them, or taking the prefetched ones); its share is
host_seconds / step seconds. The first step of each run (nothing prefetched yet, warm-up) is left out.
On this CPU the prefetch thread competes with the compute for the same cores, so the step time says little;
the host share on the critical path is the figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def packs(pack_length: int, n: int, vocab: int):
    import numpy as np

    from megalign.data.packed_dataset import Pack
    from megalign.data.source import InMemoryPacks

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        lengths = []
        while sum(lengths) < pack_length:
            lengths.append(int(min(pack_length - sum(lengths), max(16, rng.lognormal(np.log(300), 1.0)))))
        out.append(Pack(rng.integers(0, vocab, pack_length), (rng.random(pack_length) < 0.5).astype(np.uint8),
                        np.array(lengths)))
    return InMemoryPacks(out, vocab_size=vocab, name="host-bench")


def run(runtime, data, prefetch: bool, steps: int, pack_length: int, workdir: str) -> list[tuple[float, float]]:
    from megalign.config import load_config
    from megalign.training.trainer import Trainer

    cfg = load_config(ROOT / "examples" / "tiny.yaml", [
        f"data.prefetch={str(prefetch).lower()}", "data.positions=skipalign", "data.path=null",
        f"model.max_position_embeddings={pack_length}", "model.vocab_size=600", "training.global_batch=2",
        f"training.steps={steps}", "run.device=cpu", "run.progress=false", "checkpoint.resume=false",
        f"run.output_dir={workdir}"])
    trainer = Trainer(cfg, datasets=[data], runtime=runtime)
    results = [trainer.train_step() for _ in range(steps)]
    trainer.close()
    return [(r.host_seconds, r.seconds) for r in results[1:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack-length", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/megalign-bench-host")
    args = p.parse_args()
    from bench.common import code_state
    from megalign.config import load_config
    from megalign.parallel.setup import initialize, shutdown

    runtime = initialize(load_config(ROOT / "examples" / "tiny.yaml", ["run.device=cpu", "data.path=null"]))
    data = packs(args.pack_length, 2 * args.steps, 600)
    found: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for prefetch in (False, True):  # A B A B
            found[prefetch] += run(runtime, data, prefetch, args.steps, args.pack_length, args.workdir)
    shutdown()
    print(code_state())
    print("| micro-batches | steps | host wait per step, median (ms) | step, median (ms) | host share, median |")
    print("|---|---|---|---|---|")
    for prefetch, label in ((False, "built in place"), (True, "prefetched")):
        rows = found[prefetch]
        host = statistics.median(h for h, _ in rows)
        step = statistics.median(s for _, s in rows)
        share = statistics.median(h / s for h, s in rows)
        print(f"| {label} | {len(rows)} | {1000 * host:.2f} | {1000 * step:.0f} | {100 * share:.2f}% |")


if __name__ == "__main__":
    main()
