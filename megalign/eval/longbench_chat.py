"""LongBench-Chat (LongAlign, Bai et al. 2024; THUDM/LongAlign: LongBench_Chat/eval.py): real user queries over
10k-100k-token texts, each answer rated 1-10 by a judge model that sees the query, a reference answer and three
example answers with their scores.

Read at run time from the user's LongAlign checkout (LongBench_Chat/), never copied into megalign:
  test_cases.json   the queries: idx, prompt (what the model sees), query (what the judge sees), answer (the
                    reference); a JSON list. A longbench_chat.jsonl (one such record a line) is read instead
                    where there is no test_cases.json.
  prompt_fs.txt     the judge prompt, with positional {} fields: query, reference, (example answer, its score)
                    for each example, the answer to score
  few_shots.json    the scored example answers of each query (entry idx - 1)

Generation, as eval.py: the prompt middle-truncated to 64,000 tokens counted WITHOUT special tokens (eval.py
encodes with add_special_tokens=False, unlike LongBench's pred.py), up to 1,024 new tokens, in the chat template.
eval.py passes temperature=1.0 without do_sample, so it is greedy unless a model's generation config samples;
megalign is greedy.

Judging, two protocols:
  paper     (default) `passes` (2) judge passes per answer, each with the examples in its own order (shuffled,
            seeded by seed, query and pass); an answer's score is the mean of its passes, the task's the mean
            over answers, on 1-10.
  released  eval.py as released: the examples in file order, one pass, the answer with its newlines turned to
            spaces (eval.py stores predictions one a line); eval.py reports the SUM over answers, given here
            next to the mean.
In both, a pass whose reply holds no rating is asked again, up to 5 tries as eval.py; a pass still without one
fails the answer: recorded with the reason, never scored (eval.py would record "none" and lose its total).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError
from megalign.eval.items import EvalItem
from megalign.eval.judge import judge_pass
from megalign.eval.longbench import middle_truncate_counted, read_jsonl

TASK = "longbench-chat"
MAX_LENGTH = 64000  # eval.py's --max_length default
MAX_NEW_TOKENS = 1024
PROTOCOLS = ("paper", "released")
TRIES = 5  # eval.py asks again while a reply has no rating, 5 times at most
DATA_FILE, DATA_JSONL, PROMPT_FILE, FEW_SHOTS_FILE = ("test_cases.json", "longbench_chat.jsonl", "prompt_fs.txt",
                                                      "few_shots.json")
_FIELDS = ("idx", "prompt", "query", "answer")
_CHECKOUT_HINT = "give the LongAlign checkout (github.com/THUDM/LongAlign), whose LongBench_Chat/ holds it"


def _chat_dir(longalign_dir: str | Path) -> Path:
    """LongBench_Chat/ of the checkout, or the folder itself where it is LongBench_Chat/."""
    longalign_dir = Path(longalign_dir)
    inner = longalign_dir / "LongBench_Chat"
    return inner if inner.is_dir() else longalign_dir


def _read_cases(chat_dir: Path) -> list[tuple[str, dict]]:
    """(where, record) per query, from test_cases.json or else longbench_chat.jsonl."""
    path = chat_dir / DATA_FILE
    if path.is_file():
        try:
            cases = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise MegalignError(f"{path} is not valid JSON ({e}); it should be LongAlign's list of test cases") \
                from None
        if not isinstance(cases, list):
            raise MegalignError(f"{path} holds a {type(cases).__name__}, not a list of test cases")
        rows = [(f"{path} case {n}", case) for n, case in enumerate(cases, start=1)]
    elif (chat_dir / DATA_JSONL).is_file():
        path = chat_dir / DATA_JSONL
        rows = [(f"{path}:{number}", row) for number, row in read_jsonl(path, _CHECKOUT_HINT)]
    else:
        raise MegalignError(f"{path} does not exist (nor {chat_dir / DATA_JSONL}): {_CHECKOUT_HINT}")
    for where, case in rows:
        if not isinstance(case, dict):
            raise MegalignError(f"{where}: a {type(case).__name__}, not an object with {', '.join(_FIELDS)}")
        missing = [name for name in _FIELDS if name not in case]
        if missing:
            raise MegalignError(f"{where}: no {', '.join(missing)} field (a LongBench-Chat case has "
                                f"{', '.join(_FIELDS)})")
        if not isinstance(case["idx"], int) or isinstance(case["idx"], bool) or case["idx"] < 1:
            raise MegalignError(f"{where}: idx is {case['idx']!r}, not a positive integer (it indexes "
                                f"{FEW_SHOTS_FILE} from 1)")
        for name in ("prompt", "query", "answer"):
            if not isinstance(case[name], str):
                raise MegalignError(f"{where}: {name} is {type(case[name]).__name__}, not a string")
    return rows


def longbench_chat_items(longalign_dir: str | Path, tokenizer: Tokenizer,
                         max_length: int = MAX_LENGTH) -> list[EvalItem]:
    """One item per query: its prompt middle-truncated to `max_length` tokens (no special tokens counted)."""
    items, seen = [], {}
    for where, case in _read_cases(_chat_dir(longalign_dir)):
        if case["idx"] in seen:  # the runner keys results on (task, id), the judge its examples on idx
            raise MegalignError(f"{where}: idx {case['idx']} repeats {seen[case['idx']]}")
        seen[case["idx"]] = where
        cut = middle_truncate_counted(tokenizer, case["prompt"], max_length, with_bos=False)
        items.append(EvalItem(task=TASK, id=str(case["idx"]), prompt=cut.text, references=[case["answer"]],
                              max_new_tokens=MAX_NEW_TOKENS, chat=True,
                              meta={"idx": case["idx"], "query": case["query"], "input_tokens": cut.tokens,
                                    "truncated": cut.truncated}))
    return items


def _positional_fields(template: str, path: Path) -> int:
    """How many {} fields the judge prompt has; only automatic positional ones, as eval.py fills it."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise MegalignError(f"{path} is not a format string ({e}); write {{{{ }}}} for literal braces") from None
    if any(name != "" for name in names):
        raise MegalignError(f"{path} has named or numbered fields ({', '.join(n for n in names if n)}); "
                            "it is filled by position: only {} fields")
    return len(names)


class Judge:
    """Rates LongBench-Chat answers with a judge model (an OpenAIClient, or anything with its `chat`)."""

    def __init__(self, client, longalign_dir: str | Path, protocol: str = "paper", passes: int | None = None,
                 seed: int = 0, tries: int = TRIES, max_tokens: int = 1024):
        """passes: judge passes per answer (default: 2 for the paper protocol, 1 for the released one);
        tries: calls per pass while the reply holds no rating."""
        if protocol not in PROTOCOLS:
            raise MegalignError(f"unknown LongBench-Chat protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        self.client, self.protocol, self.seed = client, protocol, seed
        self.passes = passes if passes is not None else (2 if protocol == "paper" else 1)
        if self.passes < 1 or tries < 1:
            raise MegalignError(f"a judge needs at least one pass and one try (passes {self.passes}, tries {tries})")
        self.tries, self.max_tokens = tries, max_tokens
        chat_dir = _chat_dir(longalign_dir)
        prompt_path, shots_path = chat_dir / PROMPT_FILE, chat_dir / FEW_SHOTS_FILE
        for path in (prompt_path, shots_path):
            if not path.is_file():
                raise MegalignError(f"{path} does not exist: {_CHECKOUT_HINT}")
        self.template = prompt_path.read_text(encoding="utf-8")
        self._fields, self._prompt_path = _positional_fields(self.template, prompt_path), prompt_path
        try:
            self.few_shots = json.loads(shots_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise MegalignError(f"{shots_path} is not valid JSON ({e})") from None
        if not isinstance(self.few_shots, list):
            raise MegalignError(f"{shots_path} holds a {type(self.few_shots).__name__}, not a list (one entry per "
                                "query, a list of scored answers)")
        self._shots_path = shots_path

    def examples(self, idx: int) -> list[dict]:
        """Query idx's scored example answers, as few_shots.json lists them ([{"answer", "score"}, ...])."""
        where = f"{self._shots_path} entry {idx - 1} (query idx {idx})"
        if not 1 <= idx <= len(self.few_shots):
            raise MegalignError(f"{where}: there is none ({len(self.few_shots)} entries)")
        shots = self.few_shots[idx - 1]
        if not isinstance(shots, list) or not all(isinstance(s, dict) and {"answer", "score"} <= set(s)
                                                  for s in shots):
            raise MegalignError(f"{where}: not a list of {{\"answer\", \"score\"}} objects")
        if self._fields != 3 + 2 * len(shots):
            raise MegalignError(f"{self._prompt_path} has {self._fields} {{}} fields; with {len(shots)} examples "
                                f"(query idx {idx}) it needs {3 + 2 * len(shots)}: query, reference, "
                                "(answer, score) per example, the answer to score")
        return shots

    def order(self, idx: int, pass_index: int, n: int) -> list[int]:
        """The examples' order in a pass: file order (released), or a shuffle fixed by seed, idx and pass."""
        order = list(range(n))
        if self.protocol == "paper":
            # a string seed is hashed with SHA-512 by random: the same on every run and machine
            random.Random(f"longbench-chat:{self.seed}:{idx}:{pass_index}").shuffle(order)
        return order

    def prompt(self, item: EvalItem, prediction: str, order: list[int]) -> str:
        """The judge prompt for one answer, with the examples in `order`."""
        shots = self.examples(item.meta["idx"])
        answer = prediction.strip()
        if self.protocol == "released":
            answer = answer.replace("\n", " ")  # eval.py reads predictions back one a line
        scored = [value for i in order for value in (shots[i]["answer"], shots[i]["score"])]
        return self.template.format(item.meta["query"], item.references[0], *scored, answer)

    def judge_item(self, item: EvalItem, prediction: str) -> tuple[float | None, dict]:
        """(the answer's score on 1-10, or None where a pass got no rating or the judge could not be reached;
        details: protocol, each pass's example order, score, tries and reply, and the reason where None)."""
        idx = item.meta["idx"]
        n = len(self.examples(idx))
        details: dict = {"protocol": self.protocol, "passes": []}
        for pass_index in range(self.passes):
            order = self.order(idx, pass_index, n)
            text = self.prompt(item, prediction, order)
            score, reply, tries = None, "", 0
            while score is None and tries < self.tries:
                tries += 1
                try:
                    score, reply = judge_pass(self.client, text, max_tokens=self.max_tokens)
                except MegalignError as e:  # the client's own retries are spent: a failed item, tried on rerun
                    details["passes"].append({"order": order, "score": None, "tries": tries, "reply": None})
                    details["reason"] = f"judge pass {pass_index + 1}: {str(e).splitlines()[0]}"
                    return None, details
            details["passes"].append({"order": order, "score": score, "tries": tries, "reply": reply})
            if score is None:
                head = " ".join(reply.split())[:200]
                details["reason"] = (f"judge pass {pass_index + 1}: no [[rating]] from 1 to 10 in {tries} "
                                     f"replies; the last: {head!r}")
                return None, details
        scores = [p["score"] for p in details["passes"]]
        details["score"] = sum(scores) / len(scores)
        return details["score"], details


def summary(records: list[dict]) -> dict:
    """LongBench-Chat's score from the runner's records (those of task longbench-chat, `score` on 1-10):
    the mean over the scored answers (the paper's number) and their sum (what the released eval.py reports);
    failed answers are counted apart, never scored."""
    mine = [r for r in records if r["task"] == TASK]
    scores = [r["score"] for r in mine if r.get("status") == "ok" and r.get("score") is not None]
    return {"score": round(sum(scores) / len(scores), 2) if scores else None, "sum": round(sum(scores), 2),
            "items": len(mine), "scored": len(scores), "failed": len(mine) - len(scores)}
