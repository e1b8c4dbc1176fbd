"""Preference records -> groups: a prompt and its responses (chosen, then M rejected), one sample each.

Three forms of record, all with "chosen" and "rejected" (one answer, or a list of M >= 1 answers; M may differ
from record to record, the training objective averages over each group's own M):
  {"messages": [..., ending with a user turn], "chosen": ANSWER, "rejected": ANSWER | [ANSWER, ...]}
  {"conversations": [..., ending with human], "chosen": ..., "rejected": ...}                    (ShareGPT)
  {"prompt": str, "chosen": str, "rejected": str | [str, ...], "system": str (optional)}         (one user turn)
An ANSWER is a string or an assistant message ({"role": "assistant", "content": str}, or ShareGPT's
{"from": "gpt", "value": str}). Optional precomputed reference scores, one per response:
  "reference_logps": {"chosen": float, "rejected": float | [float, ...]}   (as many rejected as answers)
A dataset has them for every response or for none (preprocess.py checks).
A rejected answer equal to the chosen one (after stripping whitespace at both ends, as most templates do) is a
`chosen_equals_rejected` reject; rejected answers may repeat each other. An empty answer is `empty_response`.

Packing (preprocess.py) takes a group as one unit of its total tokens (prompt + every response): no packer splits
one, and its samples stay consecutive in role order (groups.py); `sorted`'s group_size counts groups. A group
longer than the pack is a `group_too_long` reject (overlength drop is the only policy: truncating would cut the
prompt or drop answers).

Encoding (`encode_groups`): each answer is rendered by the chat template as the conversation plus that answer,
and each rendering is cut at the start of its final run of loss-mask 1: the tokens before are the prompt, the run
(the answer and the template's end-of-turn token) is the response; tokens after it (a template's newline after the
end-of-turn token) are not kept, since nothing follows a response. Every response's prompt must be the same token
for token, so that one prompt serves them all (a template that tokenizes the boundary differently per answer is a
`prompt_not_shared` reject). The prompt's loss mask is 0, each response's is 1 on every token: its first token is
predicted from the prompt's last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megalign.data.groups import PROMPT
from megalign.data.records import Conversation, Message, RecordRejected, RejectReason, _check_text, conversation_of


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: tuple[Message, ...]  # validated: an optional system message, then turns alternating, ending with user
    answers: tuple[str, ...]  # chosen, then rejected 0 .. M-1
    reference_logps: tuple[float, ...] | None  # one per answer, same order

    def conversations(self) -> list[Conversation]:
        """The conversation ending with each answer (what the template renders)."""
        return [Conversation(self.prompt + (Message("assistant", a),)) for a in self.answers]


def _answer(value, what: str) -> str:
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        content = value.get("content", value.get("value"))
        if role not in ("assistant", "gpt") or not isinstance(content, str):
            raise RecordRejected(RejectReason.WRONG_SHAPE, f'{what} must be a string or an assistant message '
                                 '{"role": "assistant", "content": str}')
        value = content
    if not isinstance(value, str):
        raise RecordRejected(RejectReason.NON_STRING_CONTENT, f"{what} is {type(value).__name__}, not a string")
    if not value.strip():
        raise RecordRejected(RejectReason.EMPTY_RESPONSE, f"{what} is empty")
    _check_text(value, what)
    return value


def _prompt(record: dict) -> tuple[tuple, str, str]:
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        role_key, content_key = ("role", "content") if key == "messages" else ("from", "value")
        items = record[key]
        if not isinstance(items, list) or not items:
            raise RecordRejected(RejectReason.WRONG_SHAPE, f"{key} must be a non-empty list")
        last = items[-1]
        if not isinstance(last, dict) or last.get(role_key) not in ("user", "human"):
            found = last.get(role_key) if isinstance(last, dict) else type(last).__name__
            raise RecordRejected(RejectReason.PROMPT_NOT_USER_LAST,
                                 f"the prompt ({key}) ends with {found!r}, not a user turn: the answers follow it")
        return tuple(items), role_key, content_key
    if "prompt" in record:
        prompt, system = record["prompt"], record.get("system")
        if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
            raise RecordRejected(RejectReason.NON_STRING_CONTENT, '"prompt" (and "system", if given) must be strings')
        items = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt}]
        return tuple(items), "role", "content"
    raise RecordRejected(RejectReason.WRONG_SHAPE, 'a preference record needs its prompt: "messages", '
                         f'"conversations" or "prompt"; got keys {sorted(record)[:8]}')


def _reference(record: dict, rejected: int) -> tuple[float, ...] | None:
    if "reference_logps" not in record:
        return None
    ref = record["reference_logps"]
    shape = ('reference_logps must be {"chosen": float, "rejected": [float, ...]} with one number per rejected '
             f"answer ({rejected})")
    if not isinstance(ref, dict) or set(ref) != {"chosen", "rejected"}:
        raise RecordRejected(RejectReason.REFERENCE_MISMATCH, shape)
    values = ref["rejected"] if isinstance(ref["rejected"], list) else [ref["rejected"]]
    values = [ref["chosen"], *values]
    if len(values) != rejected + 1:
        raise RecordRejected(RejectReason.REFERENCE_MISMATCH, f"{len(values) - 1} rejected scores for {rejected} "
                             "rejected answers; " + shape)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise RecordRejected(RejectReason.REFERENCE_MISMATCH, f"the scores must be finite numbers; {shape}")
    return tuple(float(v) for v in values)


def preference_of(record: dict) -> PreferenceRecord:
    """The validated PreferenceRecord of a decoded JSON object, or RecordRejected."""
    prompt, role_key, content_key = _prompt(record)
    rejected = record["rejected"] if isinstance(record["rejected"], list) else [record["rejected"]]
    if not rejected:
        raise RecordRejected(RejectReason.WRONG_SHAPE, '"rejected" is an empty list: give at least one answer')
    chosen = _answer(record["chosen"], "chosen")
    answers = [chosen] + [_answer(r, f"rejected {j}") for j, r in enumerate(rejected)]
    for j, answer in enumerate(answers[1:]):
        if answer.strip() == chosen.strip():
            raise RecordRejected(RejectReason.IDENTICAL_RESPONSES, f"rejected {j} is the chosen answer")
    # The prompt's roles, contents and turn order, checked once as the conversation ending with the chosen answer.
    key = "messages" if role_key == "role" else "conversations"
    answered = conversation_of({key: [*prompt, {role_key: "assistant", content_key: chosen}]})
    return PreferenceRecord(answered.messages[:-1], tuple(answers), _reference(record, len(rejected)))


@dataclass(frozen=True)
class Group:
    tokens: np.ndarray  # the prompt's tokens, then each response's
    lengths: tuple[int, ...]  # prompt, chosen, rejected 0 .. M-1
    reference_logps: tuple[float, ...] | None


def split_at_answer(tokens: np.ndarray, loss_mask: np.ndarray) -> tuple[int, int] | None:
    """(start, end) of the final run of loss-mask 1, or None when no token has loss."""
    ones = np.flatnonzero(loss_mask)
    if not len(ones):
        return None
    end = int(ones[-1]) + 1
    zeros = np.flatnonzero(loss_mask[:end] == 0)
    return (int(zeros[-1]) + 1 if len(zeros) else 0), end


def group_of(pref: PreferenceRecord, samples: list) -> Group:
    """The group of one record from its answers' samples (templates.Sample); RecordRejected when the prompts
    differ or an answer has no tokens."""
    prompt, responses = None, []
    for j, sample in enumerate(samples):
        cut = split_at_answer(sample.tokens, sample.loss_mask)
        what = "chosen" if j == 0 else f"rejected {j - 1}"
        if cut is None or cut[0] == 0:
            raise RecordRejected(RejectReason.NO_LOSS_TOKENS, f"the template gives {what} no answer tokens after a "
                                 "prompt")
        head = sample.tokens[:cut[0]]
        if prompt is None:
            prompt = head
        elif not np.array_equal(head, prompt):
            raise RecordRejected(RejectReason.PROMPT_NOT_SHARED,
                                 f"the template's tokens before {what} differ from those before chosen (the answer "
                                 "changes how the prompt is tokenized); use a built-in template")
        responses.append(sample.tokens[cut[0]:cut[1]])
    tokens = np.concatenate([prompt, *responses])
    return Group(tokens, (len(prompt), *map(len, responses)), pref.reference_logps)


def group_starts_and_lengths(roles: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group (consecutive samples from a PROMPT to the next): its first sample and its total tokens."""
    starts = np.flatnonzero(np.asarray(roles) == PROMPT)
    totals = np.add.reduceat(np.asarray(lengths, dtype=np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    return starts, totals


def expand_groups(group_packs: list[list[int]], starts: np.ndarray, num_samples: int) -> list[list[int]]:
    """Packs of group indices -> packs of sample indices, each group's samples consecutive and in order."""
    ends = np.append(starts[1:], num_samples)
    return [[s for g in pack for s in range(int(starts[g]), int(ends[g]))] for pack in group_packs]
