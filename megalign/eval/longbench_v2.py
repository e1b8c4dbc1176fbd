"""LongBench v2 (503 multiple-choice questions over 8k-2M-word contexts), as the official scripts run it
(THUDM/LongBench at the repository root: pred.py for the prompts and the answer parsing, result.py for the table).

The user's own LongBench checkout is read at run time, never copied into megalign:
  prompts/0shot.txt             the prompt ($DOC$ the context, $Q$ the question, $C_A$..$C_D$ the choices)
  prompts/0shot_no_context.txt  the prompt without the context (no_context=True: what the model knows already)
  data.json                     the questions (the Hugging Face dataset THUDM/LongBench-v2's data.json; a JSONL
                                file of the same records also works), or the file given as data_file

As pred.py: each placeholder is replaced by its field stripped of surrounding whitespace, one after the other in
pred.py's order ($DOC$, $Q$, $C_A$, ..., so a "$Q$" inside a document is filled too, as upstream); the whole prompt
is then middle-truncated to the budget (`middle_truncate_v2`: pred.py's rule, which differs from v1's, see there;
the official budget is 120,000 tokens for 128k models, config/model2maxlen.json) and sent as the user turn of
the model's chat template, for up to 128 new tokens. The answer is the letter of "The correct answer is (X)" or
else "The correct answer is X" (`extract_answer`), and an item scores 1 when it is the record's answer. `summary`
is result.py's table (Overall, Easy, Hard, Short, Medium, Long), an empty reply left out as pred.py writes none.

Not reproduced:
- Chain of thought (pred.py --cot) is two generations per question: a first reply of up to 1,024 tokens to
  0shot_cot.txt, then that reply ($COT$) in 0shot_cot_ans.txt for up to 128 tokens, which is what gets parsed.
  An EvalItem is one prompt and one generation, and the second prompt needs the first reply, so cot=True is
  refused rather than run as one step.
- Retrieval (pred.py --rag, 0shot_rag.txt) needs retrieved chunks that data.json does not carry.
- Sampling: pred.py samples at temperature 0.1 through an OpenAI-compatible server; megalign's backends are
  greedy, so a run is deterministic and may differ slightly from a sampled one.
- Truncation counts only a BOS among the special tokens the tokenizer would add (as longbench.py); the official
  GPT/o1 runs truncate with tiktoken instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError
from megalign.eval.items import EvalItem
from megalign.eval.longbench import Truncated, read_jsonl, special_token_ids

TASK, NO_CONTEXT_TASK = "longbench-v2", "longbench-v2-no-context"
TASKS = (TASK, NO_CONTEXT_TASK)
MAX_NEW_TOKENS = 128  # pred.py without --cot
OFFICIAL_BUDGET = 120_000  # config/model2maxlen.json for the 128k models (vLLM's max_model_len: 131072)
CHOICES = ("A", "B", "C", "D")
DIFFICULTIES, LENGTHS = ("easy", "hard"), ("short", "medium", "long")
_TEXT_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
                "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
# the template placeholders in the order pred.py replaces them, and the field each is filled with
_PLACEHOLDERS = (("$DOC$", "context"), ("$Q$", "question"), ("$C_A$", "choice_A"), ("$C_B$", "choice_B"),
                 ("$C_C$", "choice_C"), ("$C_D$", "choice_D"))
_CHECKOUT_HINT = "give the LongBench checkout (github.com/THUDM/LongBench: its prompts/ folder holds 0shot.txt)"
_DATA_HINT = ("download LongBench v2's data.json (huggingface.co/datasets/THUDM/LongBench-v2) into the checkout, "
              "or give data_file")


def middle_truncate_v2(tokenizer: Tokenizer, text: str, budget: int, with_bos: bool = True) -> Truncated:
    """LongBench v2's truncation of a prompt longer than `budget` tokens, keeping both ends (pred.py's query_llm).

    Encode the text as the tokenizer encodes by default (with its BOS when it has one); if that is MORE than
    `budget` tokens, keep the first budget//2 and the last budget - budget//2 tokens (pred.py's
    ids[-max_len//2:] rounds towards minus infinity, so the tail gets the odd token: exactly `budget` kept) and
    decode the kept ids together, special tokens skipped. v1's `longbench.middle_truncate` differs on both
    counts (an odd budget keeps budget-1 there, and each half is decoded apart, which can change the text at the
    seam, e.g. SentencePiece drops the second half's leading space), hence a function of its own.
    """
    if budget < 1:
        raise MegalignError(f"a truncation budget of {budget} tokens keeps nothing; give at least 1")
    bos = [tokenizer.special_id(tokenizer.bos_token)] if with_bos and tokenizer.bos_token else []
    ids = bos + tokenizer.encode_batch([text])[0]
    if len(ids) <= budget:
        return Truncated(text, len(ids), False)
    head = budget // 2
    kept = ids[:head] + ids[len(ids) - (budget - head):]
    skipped = special_token_ids(tokenizer)
    return Truncated(tokenizer.decode([i for i in kept if i not in skipped]), len(ids), True)


# ---- the user's checkout ----


def _read_template(checkout: Path, name: str, needs_doc: bool) -> str:
    path = checkout / "prompts" / name
    if not checkout.is_dir():
        raise MegalignError(f"{checkout} is not a folder: {_CHECKOUT_HINT}")
    if not path.is_file():
        raise MegalignError(f"{path} does not exist: {_CHECKOUT_HINT}")
    template = path.read_text(encoding="utf-8")
    # a template missing a placeholder would silently drop the question, a choice or the document
    missing = [p for p, field in _PLACEHOLDERS if p not in template and (needs_doc or field != "context")]
    if missing:
        raise MegalignError(f"{path} has no {', '.join(missing)}: the prompt must name the "
                            f"{'document, ' if needs_doc else ''}question and the four choices")
    return template


def _read_data(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for every record: a JSON list (where: file[index]) or JSONL (where: file:line)."""
    if not path.is_file():
        raise MegalignError(f"{path} does not exist: {_DATA_HINT}")
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(64).lstrip()
    if not head.startswith("["):
        return [(f"{path}:{number}", row) for number, row in read_jsonl(path, _DATA_HINT)]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise MegalignError(f"{path} is not valid JSON ({e}); download data.json again") from None
    rows = []  # (a text opening with "[" that parses is a list)
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise MegalignError(f"{path}[{index}]: a {type(row).__name__}, not a JSON object")
        rows.append((f"{path}[{index}]", row))
    return rows


def _check_record(record: dict, where: str) -> None:
    missing = [name for name in _TEXT_FIELDS if name not in record]
    if missing:
        raise MegalignError(f"{where}: no {', '.join(missing)} field (a LongBench v2 record has "
                            f"{', '.join(_TEXT_FIELDS)})")
    for name in _TEXT_FIELDS:
        if not isinstance(record[name], str):
            raise MegalignError(f"{where}: {name} is {type(record[name]).__name__}, not a string")
    for name, allowed in (("answer", CHOICES), ("difficulty", DIFFICULTIES), ("length", LENGTHS)):
        if record[name] not in allowed:
            raise MegalignError(f"{where}: {name} is {record[name]!r}, not one of {', '.join(allowed)}")


def fill_template(template: str, record: dict) -> str:
    """pred.py's prompt: each placeholder replaced in turn by its field, stripped."""
    for placeholder, field in _PLACEHOLDERS:
        template = template.replace(placeholder, record[field].strip())
    return template


def longbench_v2_items(checkout_dir: str | Path, tokenizer: Tokenizer, budget: int, *,
                       data_file: str | Path | None = None, cot: bool = False,
                       no_context: bool = False) -> list[EvalItem]:
    """The items of LongBench v2 in file order, each prompt middle-truncated to `budget` tokens (the official
    OFFICIAL_BUDGET for a 128k model: leave room for the chat template and the answer).

    data_file: the questions (default: the checkout's data.json); no_context: the questions without their
    documents (task longbench-v2-no-context); cot: refused, see the module docstring.
    """
    if cot:
        raise MegalignError("LongBench v2's chain of thought is two generations per question (the second prompt "
                            "holds the first reply), which megalign does not run; evaluate without cot")
    checkout = Path(checkout_dir)
    template = _read_template(checkout, "0shot_no_context.txt" if no_context else "0shot.txt", not no_context)
    path = Path(data_file) if data_file is not None else checkout / "data.json"
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for where, record in _read_data(path):
        _check_record(record, where)
        item_id = record["_id"]
        if item_id in seen:  # the runner keys results on (task, id)
            raise MegalignError(f"{where}: _id {item_id!r} repeats {seen[item_id]}")
        seen[item_id] = where
        cut = middle_truncate_v2(tokenizer, fill_template(template, record), budget)
        meta = {"difficulty": record["difficulty"], "length": record["length"], "domain": record["domain"],
                "sub_domain": record["sub_domain"], "input_tokens": cut.tokens, "truncated": cut.truncated}
        items.append(EvalItem(task=NO_CONTEXT_TASK if no_context else TASK, id=item_id, prompt=cut.text,
                              references=[record["answer"]], max_new_tokens=MAX_NEW_TOKENS, meta=meta))
    return items


# ---- scores ----

_ANSWER_IN_PARENTHESES = re.compile(r"The correct answer is \(([A-D])\)")
_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_answer(text: str) -> str | None:
    """The answer letter as pred.py parses it, or None.

    Asterisks are dropped first (markdown bold around the sentence); then the first "The correct answer is (X)"
    anywhere in the text, else the first "The correct answer is X", X one of the capitals A-D. Case matters
    ("the correct answer is (b)" is no answer) and nothing has to follow the letter, so "The correct answer is
    Definitely (A)" reads as D, as upstream.
    """
    text = text.replace("*", "")
    match = _ANSWER_IN_PARENTHESES.search(text) or _ANSWER_BARE.search(text)
    return match.group(1) if match else None


def score(item: EvalItem, prediction: str) -> float:
    """1.0 when the parsed letter is the item's answer, else 0.0: a reply with no parsable answer is wrong, as
    pred.py judges it (result.py's `compensated` option, off there, would give it 0.25)."""
    return 1.0 if extract_answer(prediction) == item.references[0] else 0.0


_COLUMNS = ("Overall", "Easy", "Hard", "Short", "Medium", "Long")


def summary(records: list[dict]) -> dict:
    """result.py's table per task (longbench-v2, longbench-v2-no-context) from the runner's records.

    Over the records of status ok: "accuracy" has Overall (all of them), Easy and Hard (by difficulty), Short,
    Medium and Long (by length), each round(100 * correct / items, 1) as result.py (None for a bucket without
    items, where result.py would divide by zero), and "items" the count behind each. As result.py, a difficulty
    other than "easy" counts as Hard and a length other than short or medium as Long. An empty prediction is
    left out ("empty": pred.py writes no result for an empty reply), a failed item too ("failed"); "no_answer"
    counts the scored replies with no parsable letter (scored 0).
    """
    result = {}
    for task in TASKS:
        mine = [r for r in records if r.get("task") == task]
        if not mine:
            continue
        ok = [r for r in mine if r.get("status") == "ok" and r.get("score") is not None]
        scored = [r for r in ok if r.get("prediction") != ""]
        buckets: dict[str, list[float]] = {name: [] for name in _COLUMNS}
        for r in scored:
            meta = r.get("meta") or {}
            length = meta.get("length")
            for name in ("Overall", "Easy" if meta.get("difficulty") == "easy" else "Hard",
                         length.capitalize() if length in ("short", "medium") else "Long"):
                buckets[name].append(r["score"])
        result[task] = {
            "accuracy": {name: round(100 * sum(s) / len(s), 1) if s else None for name, s in buckets.items()},
            "items": {name: len(s) for name, s in buckets.items()},
            "failed": len(mine) - len(ok), "empty": len(ok) - len(scored),
            "no_answer": sum(extract_answer(r.get("prediction") or "") is None for r in scored)}
    return result
