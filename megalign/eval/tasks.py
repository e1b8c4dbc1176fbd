"""The task names of `python -m megalign.eval --tasks`: each makes its items for a tokenizer and a context window,
and scores a prediction for one of its items."""

from __future__ import annotations

from dataclasses import dataclass

from megalign.data.tokenizer import Tokenizer
from megalign.errors import OptionError
from megalign.errors import MegalignError
from megalign.eval import longbench, longbench_v2, needle, ruler
from megalign.eval.items import EvalItem

TASK_NAMES = ("needle", "ruler-synthetic", "longbench", "longbench-e", "longbench-v2", "longbench-v2-no-context",
              "longbench-chat")


@dataclass(frozen=True)
class TaskOptions:
    max_length: int  # the model's window (tokens): the longest context asked for
    seed: int = 0
    needle_lengths: int = 10  # points of the needle grid (LongAlign: 10 x 10)
    needle_depths: int = 10
    haystack_files: tuple[str, ...] = ()  # text for the needle's haystack; none: a built-in synthetic one
    ruler_lengths: tuple[int, ...] = ()  # none: 4k, 8k, ... up to max_length (or max_length alone when smaller)
    ruler_samples: int = 20  # items per RULER task and length (RULER: 500)
    longbench_dir: str | None = None  # the user's LongBench checkout (config/dataset2prompt.json, ...; data/)
    longbench_data_dir: str | None = None  # where the data JSONL files are, if not in the checkout's data/
    longbench_tasks: tuple[str, ...] = ()  # a subset of the 21 (none: all)
    longbench_budget: int | None = None  # prompt tokens before middle truncation (none: max_length - 500, as the
    #                                      official model2maxlen.json leaves room for the answer: 31500 at 32k)
    longbench_v2_dir: str | None = None  # the user's LongBench checkout's root (prompts/0shot.txt)
    longbench_v2_data: str | None = None  # LongBench v2's data.json, if not in that checkout
    longalign_dir: str | None = None  # the user's LongAlign checkout (LongBench_Chat/)


def ruler_lengths(opts: TaskOptions) -> list[int]:
    if opts.ruler_lengths:
        return list(opts.ruler_lengths)
    lengths, n = [], 4096
    while n <= opts.max_length:
        lengths.append(n)
        n *= 2
    return lengths or [opts.max_length]


def make_items(names: list[str], tokenizer: Tokenizer, opts: TaskOptions) -> list[EvalItem]:
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise OptionError("tasks", f"{', '.join(unknown)}: unknown; valid: {', '.join(TASK_NAMES)}")
    items: list[EvalItem] = []
    for name in names:
        if name == "needle":
            haystack = None
            if opts.haystack_files:
                from megalign.eval.haystack import read_text_files

                haystack = read_text_files(list(opts.haystack_files))
            items += needle.needle_items(
                tokenizer, needle.default_lengths(opts.max_length, n=opts.needle_lengths,
                                                  min_length=min(1000, opts.max_length // 2)),
                needle.default_depths(opts.needle_depths), haystack_text=haystack, seed=opts.seed)
        elif name == "ruler-synthetic":
            for task in ruler.TASKS:
                for length in ruler_lengths(opts):
                    items += ruler.make_items(task, tokenizer, length, opts.ruler_samples, seed=opts.seed)
        elif name in ("longbench", "longbench-e"):
            if not opts.longbench_dir:
                raise OptionError("longbench_dir", f"is needed for --tasks {name}: your LongBench checkout")
            items += longbench.longbench_items(opts.longbench_dir, tokenizer,
                                               opts.longbench_budget or opts.max_length - 500,
                                               tasks=list(opts.longbench_tasks) or None, e=name == "longbench-e",
                                               data_dir=opts.longbench_data_dir)
        elif name in longbench_v2.TASKS:
            if not opts.longbench_v2_dir:
                raise OptionError("longbench_v2_dir", f"is needed for --tasks {name}: your LongBench checkout (its "
                                                      "root, with prompts/0shot.txt)")
            items += longbench_v2.longbench_v2_items(opts.longbench_v2_dir, tokenizer,
                                                     opts.longbench_budget or opts.max_length - 500,
                                                     data_file=opts.longbench_v2_data,
                                                     no_context=name == longbench_v2.NO_CONTEXT_TASK)
        elif name == "longbench-chat":
            if not opts.longalign_dir:
                raise OptionError("longalign_dir", "is needed for --tasks longbench-chat: your LongAlign checkout")
            from megalign.eval.longbench_chat import longbench_chat_items

            items += longbench_chat_items(opts.longalign_dir, tokenizer)
    return items


def scorer(judge=None):
    """score(item, prediction) for every task; longbench-chat's is the judge's (1-10), which may fail: then a
    MegalignError with the reason, and the item is recorded as failed."""
    def score(item: EvalItem, prediction: str) -> float:
        if item.task == "needle":
            return needle.score_string_match(prediction, item.references)
        if item.task.startswith("ruler/"):
            return ruler.score(item.task.split("/", 1)[1], prediction, item.references)
        if item.task.startswith(("longbench/", "longbench-e/")):
            return longbench.score(item, prediction)
        if item.task in longbench_v2.TASKS:
            return longbench_v2.score(item, prediction)
        if item.task == "longbench-chat":
            if judge is None:
                raise MegalignError("longbench-chat needs a judge: --judge-model and --judge-base-url")
            value, details = judge.judge_item(item, prediction)
            if value is None:
                raise MegalignError(f"judge: {details.get('reason', 'no score')}")
            return value
        raise ValueError(f"no scorer for task {item.task!r}")

    return score


score = scorer()  # the tasks that need no judge
