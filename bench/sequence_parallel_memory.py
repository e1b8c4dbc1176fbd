"""Activation memory per rank at TP=2 with and without sequence parallelism, same run, same packs.

    python bench/sequence_parallel_memory.py [--lengths 8192 16384 32768] [--sample-length 2048]

Launches itself under torchrun (2 processes, gloo, CPU mode). For each pack length, one pack of samples of
--sample-length tokens goes through the example model (examples/tiny.yaml) once with parallel.sequence_parallel
off and once on; "activation memory" is what autograd keeps for the backward pass: the bytes of every distinct
tensor storage saved during the forward (torch.autograd.graph.saved_tensors_hooks), rank 0's. That is the
activation memory a GPU holds at the turn from forward to backward, independent of any allocator's caching.
Recompute `none` and `selective` (attention recomputed: what is left is what SP splits or leaves whole).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def saved_bytes(trainer, ref) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves for backward in one forward/backward of pack `ref`: all of
    them, and those of hidden width ([tokens, ..., hidden]: the norms' inputs and outputs and the linears'
    hidden-wide inputs, which is what sequence parallelism splits; attention's and the MLP's inner tensors and
    the logits are of other widths and stay whole)."""
    import torch

    hidden = trainer.cfg.model.hidden_size
    storages: dict[int, tuple[int, bool]] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = (storage.nbytes(), t.dim() >= 2 and t.shape[-1] == hidden)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.forward_backward([ref])
    trainer.zero_grad()
    return {"all": sum(n for n, _ in storages.values()),
            "hidden_width": sum(n for n, wide in storages.values() if wide)}


def worker(args) -> None:
    import numpy as np
    import torch.distributed as dist

    from megalign.config import load_config
    from megalign.data.packed_dataset import Pack
    from megalign.data.sampler import PackRef
    from megalign.data.source import InMemoryPacks
    from megalign.parallel.setup import initialize, shutdown
    from megalign.training.trainer import Trainer

    rows = []
    runtime = None
    for length in args.lengths:
        samples = [args.sample_length] * (length // args.sample_length)
        rng = np.random.default_rng(0)
        packs = InMemoryPacks([Pack(rng.integers(0, 600, length), np.ones(length, np.uint8), np.array(samples))],
                              vocab_size=600, name=f"{length}")
        for recompute in ("none", "selective"):
            row = {"pack_tokens": length, "samples": len(samples), "recompute": recompute}
            for sp in (False, True):
                cfg = load_config(ROOT / "examples" / "tiny.yaml", [
                    "parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}", f"model.recompute={recompute}",
                    f"model.max_position_embeddings={max(args.lengths)}", "model.vocab_size=600", "data.path=null",
                    "training.global_batch=1", "run.device=cpu", "run.progress=false", "checkpoint.resume=false",
                    f"run.output_dir={args.workdir}/run"])
                runtime = runtime or initialize(cfg)
                trainer = Trainer(cfg, datasets=[packs], runtime=runtime)
                row["sp" if sp else "no_sp"] = saved_bytes(trainer, PackRef(0, 0))
                del trainer
            row["ratio"] = round(row["sp"]["all"] / row["no_sp"]["all"], 3)
            row["hidden_width_ratio"] = round(row["sp"]["hidden_width"] / row["no_sp"]["hidden_width"], 3)
            rows.append(row)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--sample-length", type=int, default=2048)
    p.add_argument("--workdir", default="/tmp/megalign-bench-sp")
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from bench.common import code_state

    os.makedirs(args.workdir, exist_ok=True)
    out = args.out or os.path.join(args.workdir, "sp_memory.json")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, "--worker", "--out", out, "--workdir", args.workdir, "--lengths",
                    *map(str, args.lengths), "--sample-length", str(args.sample_length)],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(code_state())
    print("| pack tokens | samples | recompute | all saved, SP off (MiB) | SP on (MiB) | on / off "
          "| hidden-width saved, SP off (MiB) | SP on (MiB) | on / off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in json.loads(Path(out).read_text()):
        off, on = r["no_sp"], r["sp"]
        print(f"| {r['pack_tokens']} | {r['samples']} | {r['recompute']} | {off['all'] / 2**20:.1f} | "
              f"{on['all'] / 2**20:.1f} | {r['ratio']} | {off['hidden_width'] / 2**20:.1f} | "
              f"{on['hidden_width'] / 2**20:.1f} | {r['hidden_width_ratio']} |")


if __name__ == "__main__":
    main()
