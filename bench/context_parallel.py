"""Context parallelism on CPU: peak step memory per rank and tokens/s at CP=1 vs CP=2, the example model
(examples/tiny.yaml), packs of one long sample, the same data and steps for both, launched one after the other
from this one script (torchrun, gloo; CP=1 is one process of 2 threads, CP=2 two processes of one).

Per rank: the resident memory before a step and its peak during the step, sampled every 2 ms (the peak minus the
baseline is what the step itself needs: activations, gradients in flight, attention workspace, K/V gathered
over the CP group). Medians over the timed steps.

  python bench/context_parallel.py [--lengths 16384,32768] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from common import code_state, example_dataset  # bench/, the script's folder, is on sys.path

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeakMemory:
    """Resident memory of this process, sampled in a thread while a step runs."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.baseline = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def one_long_sample(length: int, vocab: int, packs: int):
    """Packs of a single sample of `length` random tokens, all of them targets."""
    import numpy as np

    from megalign.data.packed_dataset import Pack
    from megalign.data.source import InMemoryPacks

    rng = np.random.default_rng(0)
    return InMemoryPacks([Pack(rng.integers(0, vocab, length), np.ones(length, np.uint8), np.array([length]))
                          for _ in range(packs)], vocab_size=vocab, name=f"one-long-sample-{length}")


def worker(args) -> None:
    import torch.distributed as dist

    from megalign.config import load_config, validate
    from megalign.data.packed_dataset import PackedDataset
    from megalign.parallel.setup import shutdown, world_size_from_env
    from megalign.training.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "examples", "tiny.yaml"), [
        f"data.path={args.data}", "run.device=cpu", "model.attention_backend=sdpa", f"parallel.cp={args.cp}",
        f"model.max_position_embeddings={args.max_positions}", "training.global_batch=1", "checkpoint.save_at_end=false",
        f"run.output_dir={args.workdir}/run_cp{args.cp}", "checkpoint.resume=false"])
    validate(cfg, world_size_from_env())
    vocab = PackedDataset(args.data, verify="none").vocab_size  # the example tokenizer's
    trainer = Trainer(cfg, datasets=[one_long_sample(args.length, vocab, args.steps + 1)])
    trainer.train_step()  # warm-up: allocator, optimizer state
    records = []
    for _ in range(args.steps):
        dist.barrier()
        with PeakMemory() as memory:
            result = trainer.train_step()
        records.append({"seconds": result.seconds, "tokens": result.tokens, "loss": result.loss,
                        "baseline": memory.baseline, "peak": memory.peak})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    shutdown()


def launch(cp: int, length: int, steps: int, data: str, workdir: str, max_positions: int) -> list[list[dict]]:
    out = os.path.join(workdir, f"cp{cp}_{length}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}", __file__,
           "--worker", "--cp", str(cp), "--length", str(length), "--steps", str(steps), "--data", data,
           "--workdir", workdir, "--out", out, "--max-positions", str(max_positions)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"cp={cp} length={length} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def make_dataset(workdir: str, length: int) -> str:
    """A real dataset for the config checks (the steps themselves run on OneLongSample packs)."""
    return example_dataset(workdir, length, n_long=2, n_short=8, min_words=50, max_words=100, vocab_size=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cp", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--max-positions", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        data = make_dataset(workdir, max(lengths))
        print(code_state())
        print("| pack (one sample) | CP | peak step memory per rank | tokens/s | step time | loss |")
        print("|---|---|---|---|---|---|")
        for length in lengths:
            for cp in (1, 2):
                ranks = launch(cp, length, args.steps, data, workdir, max(lengths))
                step_mib = [statistics.median((r["peak"] - r["baseline"]) / 2**20 for r in rank) for rank in ranks]
                seconds = statistics.median(max(rank[i]["seconds"] for rank in ranks) for i in range(args.steps))
                print(f"| {length:,} | {cp} | {' / '.join(f'{m:,.0f}' for m in step_mib)} MiB | "
                      f"{length / seconds:,.0f} | {seconds:.2f} s | {ranks[0][0]['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
