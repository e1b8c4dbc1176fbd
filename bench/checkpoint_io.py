"""Checkpoint save and load time and size: the example model (examples/tiny.yaml) and a larger one, one process
on CPU, full training state (model, distributed optimizer, schedule, sampler, RNG) as the trainer writes it.

Each repeat saves a new step (publish included: fsync, rename, tracker) and loads it back into the same trainer
(manifest and size checks included); medians over repeats.

  python bench/checkpoint_io.py [--repeats 3] [--sizes tiny,0.2b]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

from common import code_state, example_dataset  # bench/, the script's folder, is on sys.path

warnings.filterwarnings("ignore")

# name -> overrides of examples/tiny.yaml
MODELS = {
    "tiny": [],
    "0.2b": ["model.num_layers=12", "model.hidden_size=1024", "model.ffn_hidden_size=2816",
             "model.num_attention_heads=16", "model.num_query_groups=4", "model.vocab_size=32000"],
}


def make_dataset(workdir: str) -> str:
    return example_dataset(workdir, 2048, n_long=4, n_short=20, min_words=50, max_words=200, vocab_size=1000)


def measure(prefix: str, workdir: str, overrides: list[str], repeats: int) -> dict:
    from megalign.config import load_config, validate
    from megalign.model.arithmetic import parameter_count
    from megalign.training.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(dir=workdir)
    cfg = load_config(os.path.join(root, "examples", "tiny.yaml"),
                      [f"data.path={prefix}", "run.device=cpu", f"run.output_dir={out}", "checkpoint.keep=1",
                       "training.global_batch=1", *overrides])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    trainer.train_step()  # Adam state exists
    saves, loads, size = [], [], 0
    for _ in range(repeats):
        trainer.step += 1  # a new step directory each time
        started = time.perf_counter()
        path = trainer.save_checkpoint()
        saves.append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        started = time.perf_counter()
        trainer.load_checkpoint(path)
        loads.append(time.perf_counter() - started)
    params = parameter_count(trainer.cfg.model, trainer.cfg.model.padded_vocab_size)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the next size builds its own groups
    return {"params": params, "bytes": size, "save_s": statistics.median(saves),
            "load_s": statistics.median(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,0.2b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        prefix = make_dataset(workdir)
        print(code_state())
        print(f"| model | parameters | checkpoint size | bytes/param | save (median of {args.repeats}) | load |")
        print("|---|---|---|---|---|---|")
        for name in args.sizes.split(","):
            r = measure(prefix, workdir, MODELS[name], args.repeats)
            print(f"| {name} | {r['params'] / 1e6:,.1f}M | {r['bytes'] / 2**20:,.1f} MiB | "
                  f"{r['bytes'] / r['params']:.1f} | {r['save_s']:.2f} s | {r['load_s']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
