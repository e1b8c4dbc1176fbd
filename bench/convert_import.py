"""Wall time and peak memory of `tools/convert_checkpoint.py import` (and optionally `export`) on a ~1B model.

The HF checkpoint is written here, not downloaded: Llama-3.2-1B's shape (16 layers, hidden 2048, FFN 8192, 32
heads, 8 KV heads, vocabulary 128256, tied embeddings: 1.24B parameters), random bf16 weights, sharded at
--shard-size (default 1GB) with model.safetensors.index.json, as transformers' save_pretrained lays it out.
The tool then runs as a subprocess while this script polls the process tree with psutil every --interval
seconds: `main` is the converter's RSS (`main anon`: less its file-backed pages, i.e. the memory-mapped
safetensors it is reading), `tree` the proportional set size (PSS) of the converter plus the writer processes
megatron's dist_checkpointing forks (they share the model's pages copy-on-write).

  /work/venv/bin/python bench/convert_import.py [--layers 16 --export --keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1 << 30


def write_hf_checkpoint(directory: Path, layers: int, shard_size: str) -> int:
    import torch

    from megalign.config import ModelConfig
    from megalign.convert.hf_config import model_config_to_hf
    from megalign.convert.hf_weights import plan
    from megalign.convert.safetensors_io import ShardedWriter, parse_size

    m = ModelConfig(num_layers=layers, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                    num_query_groups=8, vocab_size=128256, tie_embeddings=True, rotary_base=500000.0,
                    max_position_embeddings=131072, rope_scaling="llama3", rope_scaling_factor=32.0,
                    rope_original_max_position_embeddings=8192)
    directory.mkdir(parents=True)
    pieces, _ = plan(m, "LlamaForCausalLM", 128256)
    writer = ShardedWriter(directory, parse_size(shard_size))
    g = torch.Generator().manual_seed(0)
    count = 0
    for piece in pieces:
        t = torch.randn(piece.hf_shape, generator=g, dtype=torch.bfloat16)
        if not piece.hf.endswith("norm.weight"):
            t.mul_(0.02)
        writer.add(piece.hf, t)
        count += t.numel()
    writer.close()
    config = model_config_to_hf(m, "LlamaForCausalLM", "bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return count


def measure(cmd: list[str], interval: float) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main = psutil.Process(proc.pid)
    peak = {"main": 0, "main anon": 0, "tree": 0}
    polls = 0
    while proc.poll() is None:
        polls += 1
        try:
            info = main.memory_info()
            # PSS: the writer processes dist_checkpointing forks share the model's pages copy-on-write, and
            # summing their RSS would count those pages once per process
            # (read every 10th poll: reading smaps of a multi-GiB process costs CPU the converter needs)
            children = main.children(recursive=True)
            if polls % 10 == 0 or children:
                tree = sum(q.memory_full_info().pss for q in [main, *children])
                peak["tree"] = max(peak["tree"], tree)
            peak["main"] = max(peak["main"], info.rss)
            peak["main anon"] = max(peak["main anon"], info.rss - info.shared)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        time.sleep(interval)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - started, **{k: v / GiB for k, v in peak.items()}, "stdout": out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--export", action="store_true", help="also time the export back to safetensors")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temporary one, removed)")
    args = p.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        hf, out = work / "hf", work / "imported"
        for path in (hf, out, work / "exported"):
            shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        params = write_hf_checkpoint(hf, args.layers, args.shard_size)
        size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        print(f"HF checkpoint: {params / 1e9:.2f}B parameters, {size / GiB:.2f} GiB bf16 in "
              f"{len(list(hf.glob('*.safetensors')))} shards, written in {time.perf_counter() - t:.1f} s")
        tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
        r = measure(tool + ["import", "--hf", str(hf), "--out", str(out)], args.interval)
        print(f"import: {r['seconds']:.1f} s wall, peak RSS {r['main']:.2f} GiB (anonymous {r['main anon']:.2f} GiB), "
              f"process tree {r['tree']:.2f} GiB; model {size / GiB:.2f} GiB")
        print("  " + r["stdout"].strip().splitlines()[0])
        if args.export:
            r = measure(tool + ["export", "--checkpoint", str(out), "--out", str(work / "exported"),
                                "--max-shard-size", args.shard_size], args.interval)
            print(f"export: {r['seconds']:.1f} s wall, peak RSS {r['main']:.2f} GiB (anonymous "
                  f"{r['main anon']:.2f} GiB), process tree {r['tree']:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
