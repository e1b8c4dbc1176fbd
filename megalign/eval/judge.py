"""LongBench-Chat's judge, as LongAlign runs it: a judge model reads one prompt (the question, the reference answer,
scored example answers and the answer to score) and rates the answer from 1 to 10 in double brackets,
e.g. "... Rating: [[7]]". The prompt itself is built from LongBench-Chat's files elsewhere; this module sends it
and reads the rating back.
"""

from __future__ import annotations

import re

from megalign.eval.openai_client import OpenAIClient

# LongAlign's system prompt for the judge (LongBench_Chat/eval.py), greedy like its requests.
SYSTEM_PROMPT = "You're a good assistant at evaluating the quality of texts."
MIN_SCORE, MAX_SCORE = 1.0, 10.0

_BRACKETS = re.compile(r"\[\[([^\]]+)\]\]")
# A number standing alone ("8", "7.5", "8/10", "7分"), not a piece of "1e3" or "7.5.1".
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])[-+]?\d+(?:\.\d*)?(?![A-Za-z0-9.])")


def parse_score(text: str) -> float | None:
    """The rating in the LAST [[...]] of a judge reply ("[[7]]", "[[7.5]]", "Rating: [[8]]"), or None where there
    is none, it holds no number, or the number is outside 1..10.

    The last one, since a judge may quote the format ("[[rating]]") or an example before its own verdict. As in
    LongAlign, the first number inside the brackets counts ("[[8/10]]" is 8); unlike it, a sign is read, so
    "[[-3]]" is out of range (None) rather than 3.
    """
    brackets = _BRACKETS.findall(text or "")
    if not brackets:
        return None
    number = _NUMBER.search(brackets[-1])
    if number is None:
        return None
    score = float(number.group())
    return score if MIN_SCORE <= score <= MAX_SCORE else None


def judge_pass(client: OpenAIClient, prompt_text: str, max_tokens: int = 1024) -> tuple[float | None, str]:
    """One judge call: (the rating or None, the judge's whole reply). A reply with no rating is no error here:
    the caller records the item as failed with the reply. A call that fails (after the client's retries) raises."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt_text}]
    reply = client.chat(messages, max_tokens=max_tokens, temperature=0.0)
    return parse_score(reply.text), reply.text
