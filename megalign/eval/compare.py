"""Evaluation runs side by side: `python -m megalign.eval --compare OUT1 OUT2 ...` (e.g. before and after
training, `sequence` vs `token` loss, or every checkpoint of a run).

Each run is its OUT/results.json; every score it holds becomes one row: per task, and the averages of LongBench
(overall, per category, en / zh) and LongBench v2 (overall, easy/hard, short/medium/long). A score a run lacks
is "-". With two or more runs the last column is the last run minus the first.
"""

from __future__ import annotations

import json
from pathlib import Path

from megalign.errors import MegalignError


def read_results(out: str | Path) -> dict:
    path = Path(out) / "results.json"
    if not path.is_file():
        raise MegalignError(f"{path}: not found: {out} is not a finished evaluation (python -m megalign.eval --out "
                            f"{out} writes it at the end)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MegalignError(f"{path}: not JSON ({e})") from None


# what a benchmark's averages hold beside scores: per-task scores (rows already) and counts
COUNTS = ("tasks", "buckets", "failed", "items", "empty", "no_answer")


def flat_scores(results: dict) -> dict[str, float | None]:
    """Every score of one run, by row name, in the run's order."""
    rows: dict[str, float | None] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix} {key}" if prefix else key, sub)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows[prefix] = value

    for name, entry in results.get("tasks", {}).items():
        if "score" in entry:  # a task: its score (items and failed counts are in results.md)
            rows[name] = entry["score"]
        else:  # a benchmark's averages: nested {benchmark: {overall, categories: {...}, ...}}
            for benchmark, averages in entry.items():
                if isinstance(averages, dict):
                    walk(benchmark, {k: v for k, v in averages.items() if k not in COUNTS})
    return rows


def compare(outs: list[str | Path], labels: list[str] | None = None) -> str:
    """A markdown table: one row per score, one column per run (labelled by its directory name)."""
    runs = [flat_scores(read_results(o)) for o in outs]
    labels = labels or [Path(o).name or str(o) for o in outs]
    names = list(dict.fromkeys(name for run in runs for name in run))
    with_delta = len(runs) > 1
    header = ["score", *labels] + ([f"{labels[-1]} - {labels[0]}"] if with_delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        values = [run.get(name) for run in runs]
        cells = ["-" if v is None else f"{v:g}" for v in values]
        if with_delta:
            first, last = values[0], values[-1]
            cells.append("-" if first is None or last is None else f"{last - first:+.2f}")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"
