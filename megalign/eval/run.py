"""An evaluation run: items from the tasks, one generation and one score per item, written as they finish.

    OUT/items.jsonl    one line per finished item: task, id, prompt_tokens, prediction, references, score,
                       status (ok | failed), reason, meta (e.g. a needle's requested and actual depth and length)
    OUT/results.json   per task: the score (mean x 100), items, failed; the run's settings and versions
    OUT/results.md     the same as a table

A rerun with the same OUT continues: items already in items.jsonl with status ok are not generated again (an
item that failed is tried again). An item whose generation failed after the backend's retries is recorded as
failed with the reason and counted apart, never scored 0.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from megalign.errors import MegalignError
from megalign.eval.items import EvalItem
from megalign.files import write_atomically

ITEMS_FILE = "items.jsonl"


class ItemLog:
    """OUT/items.jsonl: appended one line per item as it finishes (flushed, so a kill loses at most one)."""

    def __init__(self, out: Path):
        self.path = Path(out) / ITEMS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def finished(self) -> dict[tuple[str, str], dict]:
        """The items done so far with status ok, by (task, id); a line cut short by a kill is ignored."""
        done = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("status") == "ok":
                done[(record["task"], record["id"])] = record
        return done

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Scored:
    records: list[dict] = field(default_factory=list)
    generated: int = 0  # items generated in this run (the rest came from items.jsonl)


def evaluate(items: Iterable[EvalItem], generate: Callable, score: Callable[[EvalItem, str], float], out: Path,
             progress: bool = True) -> Scored:
    """Generate and score every item not already done in OUT/items.jsonl; every item's record, in order."""
    items = list(items)
    keys = [(i.task, i.id) for i in items]
    if len(set(keys)) != len(keys):
        raise MegalignError("two items share a task and id: their results would overwrite each other")
    log = ItemLog(out)
    done = log.finished()
    todo = [i for i in items if (i.task, i.id) not in done]
    result = Scored()
    bar = tqdm(todo, desc="evaluate", unit="item", disable=not progress, leave=False)
    for item in bar:
        record = {"task": item.task, "id": item.id, "references": item.references, "meta": item.meta}
        started = time.perf_counter()
        try:
            generation = generate(item)
        except MegalignError as e:  # after the backend's own retries: recorded, not scored
            record.update(status="failed", reason=str(e).splitlines()[0][:500], prediction=None, score=None,
                          prompt_tokens=None)
        else:
            record.update(prediction=generation.text, prompt_tokens=generation.prompt_tokens,
                          new_tokens=generation.new_tokens)
            try:
                record.update(status="ok", reason=None, score=score(item, generation.text))
            except MegalignError as e:  # a judge that gave no score: the item failed, it is not a 0
                record.update(status="failed", reason=str(e).splitlines()[0][:500], score=None)
        record["seconds"] = round(time.perf_counter() - started, 3)
        log.append(record)
        done[(item.task, item.id)] = record
        result.generated += 1
    result.records = [done.get(k) or {"task": k[0], "id": k[1], "status": "failed"} for k in keys]
    return result


# tasks whose item scores are not fractions: reported as their mean (LongBench-Chat: a judge's 1-10)
RAW_MEAN_TASKS = ("longbench-chat",)


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per task: score = 100 x the mean over the items that were scored (LongBench-Chat: the mean on 1-10);
    failed items are counted, not scored."""
    tasks: dict[str, dict] = {}
    for r in records:
        t = tasks.setdefault(r["task"], {"items": 0, "failed": 0, "scores": []})
        t["items"] += 1
        if r.get("status") == "ok":
            t["scores"].append(r["score"])
        else:
            t["failed"] += 1
    scale = {name: 1 if name in RAW_MEAN_TASKS else 100 for name in tasks}
    return {name: {"score": round(scale[name] * sum(t["scores"]) / len(t["scores"]), 2) if t["scores"] else None,
                   "items": t["items"], "scored": len(t["scores"]), "failed": t["failed"]}
            for name, t in tasks.items()}


def write_results(out: Path, per_task: dict, settings: dict) -> tuple[Path, Path]:
    import torch

    results = {"tasks": per_task, "settings": settings,
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "megalign": __import__("megalign").__version__},
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    json_path, md_path = Path(out) / "results.json", Path(out) / "results.md"
    write_atomically(json_path, json.dumps(results, indent=1) + "\n")
    lines = ["| task | score | items | failed |", "|---|---|---|---|"]
    lines += [f"| {name} | {'-' if t['score'] is None else t['score']} | {t['items']} | {t['failed']} |"
              for name, t in per_task.items() if "items" in t]  # (averages over tasks are in results.json)
    write_atomically(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
