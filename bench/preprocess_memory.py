"""Peak memory (RSS) of tools/preprocess_data.py at two corpus sizes, --scale times apart (default 10).

The corpus is a synthetic mix of megalign.data.synthetic: --records chat (default), LongAlign-like long
retrieval records of --min-words..--max-words words plus --short short chats; --records text, {"text": ...}
documents, long "books" and "code files" of --min-words..--max-words words plus short notes; --long and --short
records for the small corpus, --scale times both for the large one, and a byte-level BPE tokenizer trained here
once. The small corpus is big enough (a few dozen 4 MiB chunks) for the pipeline's window of chunks in flight to
fill, so that both sizes are in steady state. Each corpus is preprocessed by

  python tools/preprocess_data.py --input long.jsonl short.jsonl [--chat-template chatml] --seq-length 65536
                                  --workers 2 --no-progress ...

as a subprocess, while this script polls the process tree every --interval seconds (default 0.02) with psutil:
the RSS of the main process, of each tokenizer worker (spawned multiprocessing pool children; the resource
tracker and any other child are left out, and named on stderr), and of main + workers at one instant (`tree`).
The peaks are reported with the corpus tokens (metadata num_tokens) and the ratio large / small, which should
be close to 1 (memory bounded by the number of samples, not of tokens). `main anon` is the main process's RSS
less its file-backed pages (psutil `shared`): the sample store memory-mapped back while writing is file-backed
and counts in RSS. Memory is near-deterministic, so one run per size is reported.

  /work/venv/bin/python bench/preprocess_memory.py [--records chat|text --long 200 --short 4000 --scale 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import code_state  # noqa: E402  (bench/, the script's folder, is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def build_corpus(directory: Path, n_long: int, n_short: int, args) -> list[str]:
    from megalign.data import synthetic

    make = synthetic.make_text_example if args.records == "text" else synthetic.make_example
    paths = make(directory, n_long, n_short, args.min_words, args.max_words, args.seed)
    return [str(paths["long"]), str(paths["short"])]


def is_worker(proc: psutil.Process) -> bool:
    """A spawned multiprocessing pool worker (not the resource tracker spawn also starts, nor a stray subprocess)."""
    cmdline = " ".join(proc.cmdline())
    return "spawn_main" in cmdline and "resource_tracker" not in cmdline


def poll_peaks(proc: subprocess.Popen, interval: float) -> dict:
    """Poll the tree under `proc` until it exits; peak RSS of main, of any one worker, and of the tree."""
    main = psutil.Process(proc.pid)
    peaks = {"main": 0, "main_anon": 0, "worker": 0, "tree": 0}
    workers: dict[int, psutil.Process] = {}
    others: dict[int, str] = {}  # other children (resource tracker, short-lived subprocesses), by command line
    while proc.poll() is None:
        try:
            mem = main.memory_info()
            children = main.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        tree = mem.rss
        for child in children:
            try:
                # a spawned worker shows its parent's command line until it execs: look again until it is one
                if child.pid not in workers:
                    if is_worker(child):
                        workers[child.pid] = child
                        others.pop(child.pid, None)
                    else:
                        others[child.pid] = " ".join(child.cmdline())[:100]
                if child.pid in workers:
                    rss = child.memory_info().rss
                    peaks["worker"] = max(peaks["worker"], rss)
                    tree += rss
            except psutil.NoSuchProcess:
                continue
        peaks["main"] = max(peaks["main"], mem.rss)
        peaks["main_anon"] = max(peaks["main_anon"], mem.rss - mem.shared)
        peaks["tree"] = max(peaks["tree"], tree)
        time.sleep(interval)
    peaks["workers_seen"], peaks["others"] = len(workers), sorted(others.values())
    return peaks


def run_preprocess(inputs: list[str], tokenizer: str, prefix: Path, args) -> dict:
    template = [] if args.records == "text" else ["--chat-template", "chatml"]
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", *inputs, "--tokenizer", tokenizer,
           *template, "--seq-length", "65536", "--output-prefix", str(prefix),
           "--workers", str(args.workers), "--no-progress", "--overwrite"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks = poll_peaks(proc, args.interval)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess_data.py failed ({proc.returncode}):\n{err.decode()}")
    peaks["seconds"] = time.perf_counter() - started
    meta = json.loads(Path(f"{prefix}.json").read_text())
    peaks.update(tokens=meta["num_tokens"], samples=meta["num_samples"], packs=meta["num_packs"])
    return peaks


def table(rows: list[tuple[str, int, dict]]) -> str:
    lines = ["| corpus | records | samples | tokens | wall s | peak main RSS MiB | peak main anon MiB "
             "| peak worker RSS MiB | peak tree RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for label, records, r in rows:
        lines.append(f"| {label} | {records:,} | {r['samples']:,} | {r['tokens']:,} | {r['seconds']:.1f} "
                     f"| {r['main'] / MiB:.0f} | {r['main_anon'] / MiB:.0f} | {r['worker'] / MiB:.0f} "
                     f"| {r['tree'] / MiB:.0f} |")
    (_, small_records, small), (_, large_records, large) = rows[0], rows[-1]

    def ratio(key: str) -> str:
        return f"{large[key] / small[key]:.2f}x" if small[key] else "-"  # no workers at --workers 1

    cells = [f"{large_records / small_records:.0f}x"] + [ratio(k) for k in (
        "samples", "tokens", "seconds", "main", "main_anon", "worker", "tree")]
    lines.append("| large / small | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", choices=("chat", "text"), default="chat", help="the kind of record (default chat)")
    p.add_argument("--long", type=int, default=200, help="long records in the small corpus (default 200)")
    p.add_argument("--short", type=int, default=4000, help="short records in the small corpus (default 4000)")
    p.add_argument("--scale", type=int, default=10, help="the large corpus is this many times the small (default 10)")
    p.add_argument("--min-words", type=int, default=2000)
    p.add_argument("--max-words", type=int, default=30000)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.02, help="polling interval in seconds (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from megalign.data import synthetic
    from megalign.data.tokenizer_training import train_bpe_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        corpus = synthetic.corpus(args.seed, n_words=200_000)  # enough text for a full 8,000-token vocabulary
        tokenizer = str(train_bpe_tokenizer(corpus, tmp / "tok", args.vocab_size))
        rows = []
        for label, k in (("small", 1), ("large", args.scale)):
            n_long, n_short = args.long * k, args.short * k
            inputs = build_corpus(tmp / label, n_long, n_short, args)
            peaks = run_preprocess(inputs, tokenizer, tmp / f"{label}-ds", args)
            expected = args.workers if args.workers > 1 else 0  # one worker tokenizes in the main process
            if peaks["workers_seen"] != expected:
                print(f"warning: saw {peaks['workers_seen']} workers in the {label} run, expected {expected}",
                      file=sys.stderr)
            for cmdline in (c for c in peaks["others"] if "resource_tracker" not in c):
                print(f"note: {label} run, other child process (not counted): {cmdline}", file=sys.stderr)
            rows.append((label, n_long + n_short, peaks))
            for path in inputs:  # keep the disk footprint to one corpus at a time
                os.remove(path)
        print(f"{code_state()}; --workers {args.workers}, polled every {args.interval * 1000:.0f} ms; {args.records} corpus = "
              f"{args.long} long ({args.min_words}-{args.max_words} words) + {args.short} short records, "
              f"times {args.scale} for large\n")
        print(table(rows))


if __name__ == "__main__":
    main()
