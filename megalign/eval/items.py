"""What a task hands to generation and gets back to score: one EvalItem per prompt.

A task module makes items (deterministically from its inputs and seed) and scores a prediction for an item;
the runner renders each item's prompt (with the model's chat template unless `chat` is False), generates, and
writes one line per item to DIR/items.jsonl (task, id, prompt_tokens, prediction, references, score, meta).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalItem:
    task: str  # e.g. "needle", "ruler/niah_single", "longbench/hotpotqa"
    id: str  # stable: the same inputs and seed give the same ids (the cache of a resumed evaluation keys on them)
    prompt: str  # the user turn (or, with chat=False, the whole text the model continues)
    references: list[str]  # what a correct answer contains / equals (task-specific)
    max_new_tokens: int
    chat: bool = True  # False: no chat template (LongBench's few-shot and code tasks)
    stop_strings: tuple[str, ...] = ()  # texts that also end the answer (LongBench's samsum: a newline), after
    #                                     at least one new token
    meta: dict = field(default_factory=dict)  # recorded in items.jsonl: e.g. requested/actual length and depth
