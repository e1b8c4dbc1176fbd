"""End-to-end throughput of the data pipeline against the raw tokenizer, side by side, for W = 1 and 2 processes.

What is measured, per worker count W, in one run on one synthetic corpus and one byte-level BPE tokenizer trained
here. --records chat (default): LongAlign-like, long retrieval records of thousands of words plus short chats;
--records text: {"text": ...} documents for continued pretraining, long "books" and "code files" of thousands of
words plus short notes (both megalign.data.synthetic):

  pipeline  megalign.data.preprocess.preprocess(PreprocessOptions(..., workers=W)): read JSONL, parse, chat
            template (chatml) or BOS/EOS (text), tokenize, spill (text: documents longer than the 65,536-token
            pack as their pieces), pack (bfd), write the megatron-core IndexedDatasets and metadata.
            Each run is a fresh spawned process, so every run pays the same start-up (the pipeline imports
            neither megatron-core nor torch); the time is the library's own PreprocessResult.seconds.
  raw       the tokenizer's fastest batch call, tokenizers.Tokenizer.encode_batch_fast (no offsets; encode_batch on
            releases without it), add_special_tokens=False, of every message content (text: every
            document's text) of the same records, in a spawn Pool of W processes, one batch call per chunk of the same records
            the pipeline hands out (CHUNK_RECORDS, CHUNK_BYTES). Timed from creating the pool to the last
            result (workers return token counts only). The texts are read from the JSONL before the clock starts.

TOKENIZERS_PARALLELISM=false in both: one tokenizer thread per process. Tokens are counted two ways:
  content tokens  the tokens of the message contents (text: of the documents): identical work for both (chatml
                  tokenizes each content as its own piece), so `ratio` = pipeline content tokens/s / raw tokens/s
                  is like for like.
  sample tokens   the pipeline's metadata num_tokens: contents plus template tokens (role headers, separators;
                  text: BOS and EOS).
Fixed start-up cost is measured separately on a tiny input (a few short records): the seconds a run costs
before it does any real work. `steady ratio` subtracts each side's start-up from its time, the ratio a corpus
large enough to amortise start-up tends to. Each cell is the median over --repeats runs; raw and pipeline
runs alternate, and `paired` is the median of each repeat's own ratio (raw seconds / pipeline seconds of the
two runs side by side), the figure least moved by other load that comes and goes. Then: CPU seconds of the
main process and of the workers on each side (where the time goes: the gap is CPU work the pipeline adds, or
idle waiting), every run's wall seconds, and `other load`, the cores
that other processes on the machine kept busy during the worst corpus run (above 0.1 the timings are skewed;
the script warns). On a shared machine --quiet CORES waits for a quiet moment before each pair and runs a pair
again when other processes used more than CORES during it (`pairs run again`); the first of a pair alternates. Last, a per-stage breakdown of the pipeline's main process (wall seconds in each library
stage, median); --profile adds a cProfile of the pipeline's main process (one extra run per W).

  /work/venv/bin/python bench/preprocess_throughput.py [--records chat|text --long 600 --short 12000 --repeats 3
                                                       --workers 1 2 --quiet CORES]

The chat defaults (12.5M content tokens, vocabulary 8,000) take about 4 minutes on 2 cores; results and reading
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import code_state  # noqa: E402  (bench/, the script's folder, is on sys.path)

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before anything imports tokenizers; spawned children inherit it
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPAWN = multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------------------------------- inputs

def build_inputs(tmp: Path, args) -> dict:
    """The corpus (long + short records of args.records), a tiny corpus for start-up cost, and the tokenizer."""
    from megalign.data import synthetic
    from megalign.data.tokenizer_training import train_bpe_tokenizer

    make = synthetic.make_text_example if args.records == "text" else synthetic.make_example
    tokenizer = train_bpe_tokenizer(synthetic.corpus(args.seed, n_words=200_000), tmp / "tokenizer", args.vocab_size)
    big = make(tmp / "big", args.long, args.short, args.min_words, args.max_words, args.seed)
    tiny = make(tmp / "tiny", 0, 8, args.min_words, args.max_words, args.seed)
    return {"tokenizer": str(tokenizer), "records": args.records, "big": [str(big["long"]), str(big["short"])],
            "tiny": [str(tiny["long"]), str(tiny["short"])]}


def record_texts(record: dict) -> list[str]:
    """What the raw tokenizer encodes of one record: its message contents, or its document text."""
    return [record["text"]] if "text" in record else [m["content"] for m in record["messages"]]


def content_chunks(paths: list[str]) -> list[list[str]]:
    """Every message content (or document), grouped by the same records as the pipeline's chunks (so many records,
    so many bytes)."""
    from megalign.data.encoding import CHUNK_BYTES, CHUNK_RECORDS

    chunks, chunk, records, size = [], [], 0, 0
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                chunk += record_texts(json.loads(line))
                records, size = records + 1, size + len(line.rstrip(b"\r\n"))
                if records >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                    chunks.append(chunk)
                    chunk, records, size = [], 0, 0
    if chunk:
        chunks.append(chunk)
    return chunks


# ---------------------------------------------------------------------------------------------- raw tokenizer

_raw_tokenizer = None


def _raw_init(tokenizer_dir: str) -> None:
    global _raw_tokenizer
    from tokenizers import Tokenizer

    _raw_tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))


def _raw_encode(texts: list[str]) -> int:
    encode = getattr(_raw_tokenizer, "encode_batch_fast", _raw_tokenizer.encode_batch)  # what the pipeline uses
    return sum(len(e.ids) for e in encode(texts, add_special_tokens=False))


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its reaped children (RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_raw(tokenizer_dir: str, chunks: list[list[str]], workers: int) -> dict:
    """Seconds, content tokens and CPU seconds (main, workers) of encoding `chunks` in a fresh spawn Pool."""
    main_cpu, worker_cpu = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with SPAWN.Pool(workers, initializer=_raw_init, initargs=(tokenizer_dir,)) as pool:
        tokens = sum(pool.imap(_raw_encode, chunks))
    seconds = time.perf_counter() - started  # the pool's exit reaps the workers, so their CPU is counted below
    return {"seconds": seconds, "tokens": tokens, "main_cpu": cpu_seconds(resource.RUSAGE_SELF) - main_cpu,
            "worker_cpu": cpu_seconds(resource.RUSAGE_CHILDREN) - worker_cpu}


# ---------------------------------------------------------------------------------------------- pipeline

STAGES = {  # (module, function) -> stage name; preprocess() calls each through its module
    ("megalign.data.preprocess", "tokenize_records"): "read+tokenize",
    ("megalign.data.packing", "pack"): "pack",
    ("megalign.data.writer", "write_packs"): "write",
    ("megalign.data.writer", "file_records"): "checksum",
}


def _time_stages(stage_seconds: dict) -> None:
    """Wrap each library stage so that its wall time adds up in stage_seconds."""
    import importlib

    def timed(fn, name):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                stage_seconds[name] = stage_seconds.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for (module, function), name in STAGES.items():
        mod = importlib.import_module(module)
        setattr(mod, function, timed(getattr(mod, function), name))


def _pipeline_child(opts, profile_path: str | None, results) -> None:
    from megalign.data.preprocess import preprocess

    stage_seconds: dict = {}
    _time_stages(stage_seconds)
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(preprocess, opts)
        profiler.dump_stats(profile_path)
    else:
        result = preprocess(opts)
    stage_seconds["other (start-up, metadata)"] = result.seconds - sum(stage_seconds.values())
    results.put({"seconds": result.seconds, "tokens": result.metadata["num_tokens"], "stages": stage_seconds,
                 "main_cpu": cpu_seconds(resource.RUSAGE_SELF), "worker_cpu": cpu_seconds(resource.RUSAGE_CHILDREN)})


def run_pipeline(inputs: list[str], tokenizer_dir: str, out_dir: Path, workers: int, records: str,
                 profile_path: str | None = None) -> dict:
    """Seconds, sample tokens, seconds per stage and CPU seconds of one preprocess() run in a fresh process.

    The main process's CPU includes its interpreter start and imports (about a second), outside `seconds`."""
    from megalign.data.preprocess import PreprocessOptions

    opts = PreprocessOptions(inputs=inputs, tokenizer=tokenizer_dir, chat_template=None if records == "text" else "chatml",
                             seq_length=65536, output_prefix=str(out_dir / "ds"), workers=workers, overwrite=True,
                             progress=False)
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_pipeline_child, args=(opts, profile_path, results))
    child.start()
    child.join()  # the result is a few numbers: the queue's buffer cannot block the child's exit
    if child.exitcode != 0:
        raise RuntimeError(f"pipeline run failed with exit code {child.exitcode}")
    return results.get()


# ---------------------------------------------------------------------------------------------- report

def machine_busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores), from /proc/stat."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def with_other_load(run, *args) -> dict:
    """Call run(*args) and add `other_load`: cores kept busy meanwhile by anything but this benchmark."""
    busy, ours = machine_busy_cpu(), cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = run(*args)
    ours = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - ours
    result["other_load"] = max(0.0, machine_busy_cpu() - busy - ours) / (time.perf_counter() - started)
    return result


def wait_for_quiet(limit: float, timeout: float) -> float:
    """Wait (up to `timeout` s) for a second in which other processes keep at most `limit` cores busy; returns it."""
    deadline, other = time.perf_counter() + timeout, float("inf")
    while time.perf_counter() < deadline:
        busy, ours = machine_busy_cpu(), cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
        time.sleep(1.0)
        other = machine_busy_cpu() - busy - (cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
                                             - ours)
        if other <= limit:
            break
    return other


def measure(files: dict, chunks, tiny_chunks, workers: int, repeats: int, out_dir: Path, quiet: float | None = None,
            tries: int = 3) -> dict:
    """Medians over `repeats` of raw and pipeline on the corpus and on the tiny input, for one worker count.

    With `quiet` (cores): each pair of runs starts once the machine is that quiet, and a pair during which other
    processes kept more than `quiet` cores busy is run again (up to `tries` times; the last try counts)."""
    runs = {"raw": [], "pipeline": [], "raw_tiny": [], "pipeline_tiny": []}
    discarded = 0
    for repeat in range(repeats):  # alternate, so that drift in the machine's speed hits both sides alike
        for attempt in range(tries if quiet is not None else 1):
            if quiet is not None:
                wait_for_quiet(quiet, timeout=120)
            pair = {"raw": lambda: with_other_load(run_raw, files["tokenizer"], chunks, workers),
                    "pipeline": lambda: with_other_load(run_pipeline, files["big"], files["tokenizer"], out_dir,
                                                        workers, files["records"])}
            order = ("raw", "pipeline") if repeat % 2 == 0 else ("pipeline", "raw")  # who goes first alternates too
            done = {side: pair[side]() for side in order}
            if quiet is None or max(r["other_load"] for r in done.values()) <= quiet or attempt == tries - 1:
                break
            discarded += 1
        for side in ("raw", "pipeline"):
            runs[side].append(done[side])
        runs["raw_tiny"].append(with_other_load(run_raw, files["tokenizer"], tiny_chunks, workers))
        runs["pipeline_tiny"].append(with_other_load(run_pipeline, files["tiny"], files["tokenizer"], out_dir, workers,
                                                     files["records"]))
    med = statistics.median
    row = {"workers": workers,
           "content_tokens": runs["raw"][0]["tokens"], "sample_tokens": runs["pipeline"][0]["tokens"],
           "stages": {k: med(r["stages"][k] for r in runs["pipeline"]) for k in runs["pipeline"][0]["stages"]},
           "max_other_load": max(r["other_load"] for r in runs["raw"] + runs["pipeline"])}  # tiny runs: too short
    for side, rs in runs.items():
        row[side] = {k: med(r[k] for r in rs) for k in ("seconds", "main_cpu", "worker_cpu")}
        row[side]["all"] = [r["seconds"] for r in rs]
    row["paired"] = med(raw["seconds"] / pipe["seconds"] for raw, pipe in zip(runs["raw"], runs["pipeline"]))
    row["discarded"] = discarded
    return row


def throughput_table(rows: list[dict]) -> str:
    lines = ["| W | raw s | raw tok/s | pipeline s | pipeline tok/s (content) | pipeline tok/s (sample) | ratio "
             "| paired | start-up s raw / pipeline | steady ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        raw, pipe = r["raw"]["seconds"], r["pipeline"]["seconds"]
        raw_start, pipe_start = r["raw_tiny"]["seconds"], r["pipeline_tiny"]["seconds"]
        raw_rate, content_rate = r["content_tokens"] / raw, r["content_tokens"] / pipe
        lines.append(f"| {r['workers']} | {raw:.1f} | {raw_rate:,.0f} | {pipe:.1f} | {content_rate:,.0f} "
                     f"| {r['sample_tokens'] / pipe:,.0f} | **{content_rate / raw_rate:.2f}** | {r['paired']:.2f} "
                     f"| {raw_start:.2f} / {pipe_start:.2f} | {(raw - raw_start) / (pipe - pipe_start):.2f} |")
    return "\n".join(lines)


def cpu_table(rows: list[dict]) -> str:
    lines = ["| W | raw CPU s main / workers | pipeline CPU s main / workers | raw runs s | pipeline runs s "
             "| other load, worst run | pairs run again |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        raw, pipe = r["raw"], r["pipeline"]
        lines.append(f"| {r['workers']} | {raw['main_cpu']:.1f} / {raw['worker_cpu']:.1f} "
                     f"| {pipe['main_cpu']:.1f} / {pipe['worker_cpu']:.1f} "
                     f"| {', '.join(f'{s:.1f}' for s in raw['all'])} | {', '.join(f'{s:.1f}' for s in pipe['all'])} "
                     f"| {r['max_other_load']:.2f} cores | {r['discarded']} |")
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> str:
    names = list(rows[0]["stages"])
    lines = ["| W | " + " | ".join(names) + " | total |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        cells = " | ".join(f"{r['stages'][n]:.2f}" for n in names)
        lines.append(f"| {r['workers']} | {cells} | {r['pipeline']['seconds']:.2f} |")
    return "\n".join(lines)


def print_profile(path: str, top: int) -> None:
    import pstats

    pstats.Stats(path).sort_stats("tottime").print_stats(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", choices=("chat", "text"), default="chat", help="the kind of record (default chat)")
    p.add_argument("--long", type=int, default=600, help="long records (default 600)")
    p.add_argument("--short", type=int, default=12000, help="short records (default 12000)")
    p.add_argument("--min-words", type=int, default=2000, help="words per long record, at least (default 2000)")
    p.add_argument("--max-words", type=int, default=30000, help="words per long record, at most (default 30000)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    p.add_argument("--profile", action="store_true", help="also cProfile the pipeline's main process, per W")
    p.add_argument("--quiet", type=float, metavar="CORES",
                   help="start each raw/pipeline pair once other processes use at most CORES, and run a pair again "
                        "(up to 3 times; waits 2 min at most) when they used more during it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        files = build_inputs(tmp, args)
        chunks, tiny_chunks = content_chunks(files["big"]), content_chunks(files["tiny"])
        print(f"{code_state()}; {args.records} corpus: {args.long} long records ({args.min_words}-{args.max_words} "
              f"words) + {args.short} short ones, "
              f"{sum(map(len, chunks))} texts; tokenizer vocab {args.vocab_size}; "
              f"built in {time.perf_counter() - started:.1f} s\n")
        rows = []
        for w in args.workers:
            rows.append(measure(files, chunks, tiny_chunks, w, args.repeats, tmp, quiet=args.quiet))
            print(f"W={w} done", file=sys.stderr)
        r = rows[0]
        print(f"content tokens {r['content_tokens']:,}; sample tokens {r['sample_tokens']:,} (template or BOS/EOS adds "
              f"{r['sample_tokens'] / r['content_tokens'] - 1:.1%}); medians of {args.repeats} run(s)\n")
        print(throughput_table(rows))
        print("\nCPU seconds (median) and every run's wall seconds:\n")
        print(cpu_table(rows))
        print("\npipeline main process, wall seconds per stage (median):\n")
        print(stage_table(rows))
        if max(r["max_other_load"] for r in rows) > 0.1:
            print("\nwarning: other processes used CPU during the runs (see `other load`); the timings are skewed")
        if args.profile:
            for w in args.workers:
                path = str(tmp / f"profile-w{w}.pstats")
                run_pipeline(files["big"], files["tokenizer"], tmp, w, files["records"], profile_path=path)
                print(f"\ncProfile of the pipeline's main process, W={w} (top by own time):")
                print_profile(path, 15)


if __name__ == "__main__":
    main()
