"""LongBench v1 (21 tasks) and LongBench-E (13 of them, sampled evenly over length), as the official scripts run
them (THUDM/LongBench: LongBench/pred.py for the prompts, eval.py and metrics.py for the scores).

The user's own LongBench checkout is read at run time, never copied into megalign:
  config/dataset2prompt.json   the prompt of each task ({context}, {input} and any other field of a record)
  config/dataset2maxlen.json   the tokens to generate for each task
  data/{task}.jsonl            the samples (LongBench-E: data/{task}_e.jsonl), as LongBench's data.zip unpacks

As pred.py, each prompt is formatted from its record, then middle-truncated to the window (`middle_truncate`),
and only then wrapped in the chat template, except for the six tasks pred.py sends as plain text (few-shot and
code: the model continues the text). Generation is greedy for `dataset2maxlen` tokens; scores are
longbench_metrics' (the official metrics, quirks included).

samsum's extra stop: as pred.py, generation also ends at the "\\n" token (the last id of encoding "\\n", as
pred.py takes it), and the first new token is never a stop token (pred.py's min_length: the model writes its
next choice instead); a merged "\\n\\n" token does not stop it. The
openai backend sends stop=["\\n"] instead (the server matches text, so a merged "\\n\\n" does stop it there).

Not reproduced:
- pred.py's per-model prompt wrappers (e.g. "[INST]...[/INST]") and post-processing: megalign renders the
  model's own chat template instead.
- Truncation counts only a BOS among the special tokens the tokenizer would add (not an EOS or ChatGLM's prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError
from megalign.eval import longbench_metrics
from megalign.eval.items import EvalItem

TASKS = tuple(longbench_metrics.TASK_METRIC)  # the 21, in LongBench's order
E_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
           "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")  # pred.py --e
# pred.py skips the chat template for these: the model continues few-shot examples or code
PLAIN_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
TASK_PREFIX, E_TASK_PREFIX = "longbench/", "longbench-e/"
_REQUIRED_FIELDS = ("input", "context", "answers", "length", "_id")
_CHECKOUT_HINT = "give the LongBench checkout (github.com/THUDM/LongBench, its LongBench/ folder holds config/)"


@dataclass(frozen=True)
class Truncated:
    text: str
    tokens: int  # of the text before truncation, counted as the rule counts them
    truncated: bool


@lru_cache(maxsize=8)
def _hf_special_added_ids(tokenizer_json: str, fingerprint: str) -> frozenset[int]:
    """The added tokens a tokenizer.json marks special: those a decode with skip_special_tokens drops."""
    with open(tokenizer_json, encoding="utf-8") as f:
        added = json.load(f).get("added_tokens") or []
    return frozenset(t["id"] for t in added if t.get("special"))


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """What `decode(..., skip_special_tokens=True)` drops: BOS, EOS, the config's *_token entries and, for a
    tokenizer.json, every added token marked special (our Tokenizer.decode keeps them all, so we drop them first:
    the Rust decoder filters ids the same way before decoding)."""
    names = {tokenizer.bos_token, tokenizer.eos_token, *tokenizer.special_tokens_map.values()} - {None}
    ids = set()
    for name in names:
        try:
            ids.add(tokenizer.special_id(name))
        except MegalignError:  # a config may name a token the vocabulary lacks
            pass
    if getattr(tokenizer, "kind", None) == "hf":
        ids |= _hf_special_added_ids(tokenizer.path, tokenizer.fingerprint)
    return frozenset(ids)


def middle_truncate_counted(tokenizer: Tokenizer, text: str, budget: int, with_bos: bool = True) -> Truncated:
    """`middle_truncate`, also saying how many tokens the text had and whether it was cut."""
    if budget < 2:
        raise MegalignError(f"a truncation budget of {budget} tokens keeps nothing; give at least 2")
    bos = [tokenizer.special_id(tokenizer.bos_token)] if with_bos and tokenizer.bos_token else []
    ids = bos + tokenizer.encode_batch([text])[0]
    if len(ids) <= budget:
        return Truncated(text, len(ids), False)
    half = int(budget / 2)
    skipped = special_token_ids(tokenizer)

    def decode(part: list[int]) -> str:
        return tokenizer.decode([i for i in part if i not in skipped])

    return Truncated(decode(ids[:half]) + decode(ids[-half:]), len(ids), True)


def middle_truncate(tokenizer: Tokenizer, text: str, budget: int, with_bos: bool = True) -> str:
    """LongBench's truncation of a prompt longer than `budget` tokens, keeping both ends (instructions sit there).

    The rule (pred.py): encode the text as the tokenizer encodes by default, i.e. with its BOS when it has one
    (with_bos=False: without, as LongBench-Chat's eval.py); if that is MORE than `budget` tokens, keep the first
    int(budget/2) and the last int(budget/2) tokens, decode each half with the special tokens skipped (the BOS
    among them), and join the two strings. An odd budget keeps budget-1 tokens; a text that fits comes back
    unchanged. Re-encoding the result may give a few tokens more or fewer than kept (a word or a multi-byte
    character cut at a seam), as upstream. A budget under 2 is refused (upstream's ids[-0:] would keep it all).
    """
    return middle_truncate_counted(tokenizer, text, budget, with_bos).text


# ---- the user's checkout ----


def _checkout_root(longbench_dir: Path) -> Path:
    """The folder holding config/: the checkout itself, or its LongBench/ folder (the repository's layout since
    LongBench v2 moved v1 there)."""
    for root in (longbench_dir, longbench_dir / "LongBench"):
        if (root / "config").is_dir():
            return root
    return longbench_dir


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise MegalignError(f"{path} does not exist: {_CHECKOUT_HINT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MegalignError(f"{path} is not valid JSON ({e}); it should map each task to its {what}") from None


def _task_table(path: Path, what: str, tasks: list[str], kind: type) -> dict:
    table = _read_json(path, what)
    if not isinstance(table, dict):
        raise MegalignError(f"{path} holds a {type(table).__name__}, not an object mapping each task to its {what}")
    for task in tasks:
        if task not in table:
            raise MegalignError(f"{path} has no {what} for task {task!r} (it has: {', '.join(table) or 'none'})")
        value = table[task]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
            raise MegalignError(f"{path}: the {what} of task {task!r} is {value!r}, not a "
                                f"{'positive integer' if kind is int else 'string'}")
    return table


def read_jsonl(path: Path, hint: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; a bad line is an error naming it."""
    if not path.is_file():
        raise MegalignError(f"{path} does not exist: {hint}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise MegalignError(f"{path}:{number}: not valid JSON ({e}); each line should be one JSON object "
                                    "(re-extract the file)") from None
            if not isinstance(row, dict):
                raise MegalignError(f"{path}:{number}: a {type(row).__name__}, not a JSON object")
            rows.append((number, row))
    return rows


def _check_record(record: dict, task: str, where: str) -> None:
    missing = [name for name in _REQUIRED_FIELDS if name not in record]
    if missing:
        raise MegalignError(f"{where}: no {', '.join(missing)} field (a LongBench record has "
                            f"{', '.join(_REQUIRED_FIELDS)})")
    answers = record["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise MegalignError(f"{where}: answers is {type(answers).__name__}, not a list of strings")
    if not isinstance(record["length"], int) or isinstance(record["length"], bool):
        raise MegalignError(f"{where}: length is {record['length']!r}, not an integer")
    classes = record.get("all_classes")
    if longbench_metrics.TASK_METRIC[task] == "classification" and not isinstance(classes, list):
        raise MegalignError(f"{where}: task {task} is scored against all_classes, and this record has "
                            f"{classes!r}, not a list of labels")


def _format_prompt(template: str, record: dict, task: str, prompt_file: Path, where: str) -> str:
    try:
        return template.format(**record)  # as pred.py: every field of the record may be named
    except KeyError as e:
        raise MegalignError(f"{prompt_file}: the {task} prompt names {{{e.args[0]}}}, which {where} does not "
                            "have") from None
    except (ValueError, IndexError) as e:
        raise MegalignError(f"{prompt_file}: the {task} prompt is not a format string with named fields ({e}); "
                            "use {context} and {input}, and {{ }} for literal braces") from None


def longbench_items(longbench_dir: str | Path, tokenizer: Tokenizer, max_length: int, tasks: list[str] | None = None,
                    e: bool = False, data_dir: str | Path | None = None) -> list[EvalItem]:
    """The items of LongBench's tasks (LongBench-E's with e=True), in file order, each prompt middle-truncated
    to `max_length` tokens (pred.py's model2maxlen: leave room for the chat template and the answer).

    tasks: LongBench names (default: all 21, or LongBench-E's 13); data_dir: where {task}.jsonl are (default:
    the checkout's data/).
    """
    known = E_TASKS if e else TASKS
    tasks = list(known) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise MegalignError(f"unknown {'LongBench-E' if e else 'LongBench'} task {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(known)}")
    root = _checkout_root(Path(longbench_dir))
    prompt_file, maxlen_file = root / "config" / "dataset2prompt.json", root / "config" / "dataset2maxlen.json"
    prompts = _task_table(prompt_file, "prompt", tasks, str)
    max_new = _task_table(maxlen_file, "generation length", tasks, int)
    data = Path(data_dir) if data_dir is not None else root / "data"
    prefix = E_TASK_PREFIX if e else TASK_PREFIX
    hint = (f"unzip LongBench's data.zip (the Hugging Face dataset THUDM/LongBench) so that {data} holds "
            f"{{task}}{'_e' if e else ''}.jsonl, or give data_dir")

    items: list[EvalItem] = []
    for task in tasks:
        path = data / f"{task}{'_e' if e else ''}.jsonl"
        seen: dict[str, int] = {}
        for number, record in read_jsonl(path, hint):
            where = f"{path}:{number}"
            _check_record(record, task, where)
            item_id = str(record["_id"])
            if item_id in seen:  # the runner keys results on (task, id)
                raise MegalignError(f"{where}: _id {item_id!r} repeats line {seen[item_id]}")
            seen[item_id] = number
            cut = middle_truncate_counted(tokenizer, _format_prompt(prompts[task], record, task, prompt_file, where),
                                          max_length)
            meta = {"dataset": task, "language": record.get("language"), "length": record["length"],
                    "all_classes": record.get("all_classes"), "input_tokens": cut.tokens, "truncated": cut.truncated}
            if e:
                meta["bucket"] = longbench_metrics.length_bucket(record["length"])
            items.append(EvalItem(task=prefix + task, id=item_id, prompt=cut.text, references=list(record["answers"]),
                                  max_new_tokens=max_new[task], chat=task not in PLAIN_TASKS, meta=meta,
                                  stop_strings=("\n",) if task == "samsum" else ()))
    return items


# ---- scores ----


def task_name(item_task: str) -> str:
    """The LongBench name of an item's task: hotpotqa for longbench/hotpotqa and longbench-e/hotpotqa."""
    for prefix in (TASK_PREFIX, E_TASK_PREFIX):
        if item_task.startswith(prefix):
            return item_task[len(prefix):]
    raise MegalignError(f"{item_task!r} is no LongBench task (they start with {TASK_PREFIX} or {E_TASK_PREFIX})")


def score(item: EvalItem, prediction: str) -> float:
    """One item's score in [0, 1], by the official metric of its task."""
    return longbench_metrics.score_prediction(task_name(item.task), prediction, item.references,
                                              item.meta.get("all_classes"))


def summary(records: list[dict]) -> dict:
    """LongBench's scores from the runner's records (the LongBench ones among them; failed items are counted
    apart, never scored 0).

    Per benchmark ("longbench", "longbench-e"): `tasks`, each task's round(100 * mean, 2) as the official
    eval.py; for LongBench-E also `buckets`, each task's scores per length bucket (0-4k, 4-8k, 8k+) as
    eval.py --e; `failed`, the failed items per task (where any). The official eval.py computes no averages:
    `categories`, `overall`, `en` and `zh` are longbench_metrics.summarize's (see there how they are made).
    """
    benchmarks: dict[str, dict[str, dict[str, list]]] = {}
    for record in records:
        for prefix in (TASK_PREFIX, E_TASK_PREFIX):
            if record["task"].startswith(prefix):
                task = benchmarks.setdefault(prefix.rstrip("/"), {}).setdefault(
                    record["task"][len(prefix):], {"scores": [], "lengths": [], "failed": 0})
                if record.get("status") == "ok" and record.get("score") is not None:
                    task["scores"].append(record["score"])
                    task["lengths"].append((record.get("meta") or {}).get("length"))
                else:
                    task["failed"] += 1
    result = {}
    for benchmark, tasks in benchmarks.items():
        scored = {name: t for name, t in tasks.items() if t["scores"]}
        # per_task in LongBench's order, so averages and tables read the same every time
        per_task = {name: longbench_metrics.task_score(scored[name]["scores"]) for name in TASKS if name in scored}
        entry: dict = {"tasks": per_task}
        if benchmark == E_TASK_PREFIX.rstrip("/"):
            entry["buckets"] = {name: longbench_metrics.bucket_scores(scored[name]["scores"], scored[name]["lengths"])
                                for name in per_task}
        failed = {name: t["failed"] for name, t in tasks.items() if t["failed"]}
        if failed:
            entry["failed"] = failed
        if per_task:
            entry.update(longbench_metrics.summarize(per_task))
        result[benchmark] = entry
    return result

