"""RULER's synthetic tasks made offline (Hsieh et al. 2024; NVIDIA/RULER scripts/data/synthetic): needles in a
noise haystack (single, multi-key, multi-value, multi-query), variable tracking and common-word extraction,
scored by RULER's string match.

Each prompt is the instruction, the context and the question; the WHOLE prompt is counted: its tokens (the
model's tokenizer, no special tokens) plus the task's max_new_tokens fit `length`. The chat template's tokens
are not counted: leave room for them in `length`. As RULER does, the haystack size (noise units; distinct
words for cwe) is the largest that fits, found by binary search; unlike RULER, the search runs for every item
after its random draws are fixed, so no item overflows and none is cut short by another item's luck.
The wording is ours; the needle sentence and the noise text are RULER's. Left out: RULER's answer prefix and
its few-shot example for cwe.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Callable

from megalign.data import synthetic
from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError
from megalign.eval.haystack import NOISE, count_tokens, largest_fitting
from megalign.eval.items import EvalItem

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
VALUE_TYPES = ("numbers", "uuids")

# (keys in the haystack, values per key, keys asked about), as RULER's synthetic.yaml
_NIAH = {
    "niah_single": (1, 1, 1),
    "niah_multikey": (4, 1, 1),  # three distractor keys
    "niah_multivalue": (1, 4, 1),
    "niah_multiquery": (4, 1, 4),
}
MAX_NEW_TOKENS = {**{task: 128 for task in _NIAH}, "vt": 30, "cwe": 120}  # RULER's tokens_to_generate

NEEDLE = "One of the special magic {kinds} for {key} is: {value}."
NIAH_PROMPT = ("The text below hides special magic {kinds} among filler sentences. Note each one: a question "
               "about them follows the text.\n\n{context}\n\nQuestion: {question}")
NIAH_QUESTION_ONE = "Which special magic {kind} does the text give for {query}?"
NIAH_QUESTION_ALL = "Which special magic {kinds} does the text give for {query}? List every one."
VT_HOPS = 4  # RULER's vt: one chain of 4 hops, 5 variables
VT_PROMPT = ("The text below hides a chain of variable assignments among filler sentences. Follow each "
             "assignment: a question about them follows the text.\n\n{context}\n\nQuestion: Which variables "
             "hold the value {value}, directly or through other variables? List every one.")
CWE_COMMON = 10
CWE_PROMPT = ("Below is a numbered list of words. Some words occur much more often than the rest; count them as "
              "you read.\n\n{context}\n\nQuestion: Which {common} words occur most often in the list? List them.")


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's string_match_all for one item: the fraction of references found in the prediction, ignoring case."""
    if not references:
        raise ValueError("string match needs at least one reference")
    found = prediction.lower()
    return sum(r.lower() in found for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's string_match_part (its QA metric) for one item: 1 if any reference is in the prediction."""
    if not references:
        raise ValueError("string match needs at least one reference")
    found = prediction.lower()
    return float(any(r.lower() in found for r in references))


METRICS: dict[str, Callable[[str, list[str]], float]] = {task: string_match_all for task in TASKS}  # as RULER


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise MegalignError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")


def score(task: str, prediction: str, references: list[str]) -> float:
    """The item's score in [0, 1] (RULER reports the mean over items, times 100)."""
    _check_task(task)
    return METRICS[task](prediction, references)


@dataclass(frozen=True)
class _Draw:
    """One item's random choices, fixed before the haystack size is searched."""

    build: Callable[[int], str]  # the prompt with n haystack units
    references: list[str]
    meta: dict
    fewest: int  # the smallest haystack the task makes sense with
    most: int | None = None  # the largest one there is material for


def _distinct(n: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _with_inserts(units: int, inserts: list[str], fractions: list[float]) -> str:
    """`units` noise lines with each insert at its fraction of the way through (ties keep the inserts' order)."""
    at: dict[int, list[str]] = {}
    for text, f in zip(inserts, fractions):
        at.setdefault(min(units, int(f * (units + 1))), []).append(text)
    lines: list[str] = []
    for slot in range(units + 1):
        lines += at.get(slot, [])
        if slot < units:
            lines.append(NOISE)
    return "\n".join(lines)


_KEY_WORDS = sorted({w for w in synthetic.WORDS if len(w) >= 4})


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER's 7-digit numbers
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))  # seeded, unlike uuid4()


def _niah(task: str, rng: random.Random, value_type: str) -> _Draw:
    n_keys, n_values, n_queries = _NIAH[task]
    kinds = value_type
    keys = _distinct(n_keys, lambda: f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}")
    all_values = _distinct(n_keys * n_values, lambda: _value(rng, value_type))
    values = {key: all_values[i * n_values:(i + 1) * n_values] for i, key in enumerate(keys)}
    needles = [NEEDLE.format(kinds=kinds, key=key, value=v) for key in keys for v in values[key]]
    rng.shuffle(needles)
    fractions = [rng.random() for _ in needles]
    queries = rng.sample(keys, n_queries)
    references = [v for q in queries for v in values[q]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + " and " + queries[-1]
    question = (NIAH_QUESTION_ONE if len(references) == 1 else NIAH_QUESTION_ALL).format(
        kind=kinds[:-1], kinds=kinds, query=query)

    def build(units: int) -> str:
        return NIAH_PROMPT.format(kinds=kinds, context=_with_inserts(units, needles, fractions), question=question)

    meta = {"keys": keys, "queries": queries, "needles": len(needles), "value_type": value_type}
    return _Draw(build, references, meta, fewest=0)


def _vt(rng: random.Random) -> _Draw:
    names = _distinct(VT_HOPS + 1, lambda: "".join(rng.choices(string.ascii_uppercase, k=5)))
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_HOPS)]
    fractions = sorted(rng.random() for _ in chain)  # in order: each assignment after the one it reads

    def build(units: int) -> str:
        return VT_PROMPT.format(context=_with_inserts(units, chain, fractions), value=value)

    return _Draw(build, names, {"value": value, "chain": chain}, fewest=0)


# cwe needs thousands of distinct words at long lengths: the synthetic vocabulary (minus the prompt's own words,
# which an answer repeats anyway), then made-up words from a fixed stream, the same on every run
_PROMPT_WORDS = set(re.findall(r"[a-z]+", CWE_PROMPT.lower()))
_CWE_WORDS = [w for w in _KEY_WORDS if w not in _PROMPT_WORDS]
_MADE_UP: list[str] = []
_MADE_UP_RNG = random.Random("megalign/ruler/cwe-words")
_ONSETS = "b d f g h k l m n p r s t v w z br dr fl gr kl pl pr st tr".split()


def _made_up_words(n: int) -> list[str]:
    taken = set(_MADE_UP) | set(_CWE_WORDS) | _PROMPT_WORDS
    while len(_MADE_UP) < n:
        syllables = _MADE_UP_RNG.randint(2, 3)
        word = "".join(_MADE_UP_RNG.choice(_ONSETS) + _MADE_UP_RNG.choice("aeiou") for _ in range(syllables))
        word += _MADE_UP_RNG.choice(["", "", "n", "r", "l", "s"])
        if word not in taken:
            taken.add(word)
            _MADE_UP.append(word)
    return _MADE_UP[:n]


def _cwe(rng: random.Random, length: int) -> _Draw:
    # RULER's counts: each common word 30 times, the others 3; below 4k tokens 6 and 1
    common_repeats, other_repeats = (30, 3) if length >= 4096 else (6, 1)
    # every list entry ("12. word") takes at least two tokens: that bounds how many words can fit
    most = CWE_COMMON + length // (2 * other_repeats) + 1
    real, made_up = list(_CWE_WORDS), _made_up_words(max(0, most - len(_CWE_WORDS)))
    rng.shuffle(real)
    rng.shuffle(made_up)
    words = (real + made_up)[:most]  # real words first: the common ones are always real
    order_seed = rng.getrandbits(64)

    def build(distinct: int) -> str:
        chosen = words[:distinct]
        entries = chosen[:CWE_COMMON] * common_repeats + chosen[CWE_COMMON:] * other_repeats
        random.Random(order_seed).shuffle(entries)
        context = " ".join(f"{i}. {w}" for i, w in enumerate(entries, 1))
        return CWE_PROMPT.format(context=context, common=CWE_COMMON)

    meta = {"common_repeats": common_repeats, "other_repeats": other_repeats}
    return _Draw(build, words[:CWE_COMMON], meta, fewest=CWE_COMMON, most=len(words))


def make_items(task: str, tokenizer: Tokenizer, length: int, n: int, seed: int = 0, *,
               value_type: str = "numbers") -> list[EvalItem]:
    """`n` items of RULER task `task` whose prompt tokens + max_new_tokens fit `length` (see the module doc).

    value_type: what the niah needles hide, "numbers" (7 digits) or "uuids"; the other tasks ignore it.
    The same arguments and tokenizer give the same items.
    """
    _check_task(task)
    if value_type not in VALUE_TYPES:
        raise MegalignError(f"RULER value_type {value_type!r}; valid: {', '.join(VALUE_TYPES)}")
    max_new_tokens = MAX_NEW_TOKENS[task]
    budget = length - max_new_tokens
    items, guess = [], None
    for index in range(n):
        rng = random.Random(f"ruler/{task}/{seed}/{index}")  # a string seed is hashed the same on every run
        if task in _NIAH:
            draw = _niah(task, rng, value_type)
        else:
            draw = _vt(rng) if task == "vt" else _cwe(rng, length)
        tokens: dict[int, int] = {}

        def fits(units: int) -> bool:
            if draw.most is not None and units > draw.most:
                return False
            if units not in tokens:
                tokens[units] = count_tokens(tokenizer, draw.build(units))
            return tokens[units] <= budget

        step = 1  # the previous item's answer is at most a few units off
        if guess is None:  # tokens per haystack unit, from two small haystacks
            probe = draw.fewest + 16 if draw.most is None else min(draw.most, draw.fewest + 16)
            fits(draw.fewest)
            fits(probe)
            per_unit = max((tokens[probe] - tokens[draw.fewest]) / max(probe - draw.fewest, 1), 1e-3)
            guess = draw.fewest + max(0, int((budget - tokens[draw.fewest]) / per_unit))
            step = max(1, guess // 64)
        units = largest_fitting(fits, draw.fewest, guess, step)
        if units is None:
            raise MegalignError(f"ruler/{task} does not fit {length} tokens: its smallest prompt has "
                                f"{tokens[draw.fewest]} tokens, and the answer needs {max_new_tokens} more")
        guess = units
        prompt = draw.build(units)
        digest = hashlib.sha256("\0".join([prompt, *draw.references]).encode()).hexdigest()[:10]
        items.append(EvalItem(
            task=f"ruler/{task}",
            id=f"ruler/{task}/len{length}/seed{seed}/{index}/{digest}",
            prompt=prompt,
            references=list(draw.references),
            max_new_tokens=max_new_tokens,
            meta={"length": length, "prompt_tokens": tokens[units], "haystack_units": units, **draw.meta},
        ))
    return items
