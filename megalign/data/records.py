"""JSONL records -> Conversation or document text, with a named reason for every record that is turned away.

Three kinds of record, recognised from their keys (`record_kind`):
  chat  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (LongAlign, OpenAI)
        {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}      (ShareGPT)
  text  {"text": str, ...}                                                             (raw documents; other keys
                                                                                        are ignored)
  preference  a prompt with "chosen" and "rejected" answers (preference.py parses them)
A record with "chosen" and "rejected" is a preference record even if it has chat keys (its prompt is one); a
record with chat keys is a chat even if it also has "text" (chat datasets often carry a rendered copy).
A conversation is: an optional system message, then user/assistant turns alternating, starting with a user
turn and ending with an assistant turn (a trailing user turn would be tokens that never carry loss).
One input holds one kind: `input_kind` finds a file's kind from its first record that has one.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator

from megalign.errors import MegalignError

CHAT, TEXT, PREFERENCE = "chat", "text", "preference"
RECORD_KINDS = (CHAT, TEXT, PREFERENCE)
CHAT_KEYS = ("messages", "conversations")
PREFERENCE_KEYS = ("chosen", "rejected")
KIND_KEYS = {CHAT: '"messages"/"conversations"', TEXT: '"text"', PREFERENCE: '"chosen" + "rejected"'}

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


class RejectReason(str, Enum):
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    TOO_LARGE = "too_large"
    WRONG_SHAPE = "wrong_shape"
    UNKNOWN_ROLE = "unknown_role"
    NON_STRING_CONTENT = "non_string_content"
    EMPTY_CONTENT = "empty_content"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    BAD_TURN_ORDER = "bad_turn_order"
    TOO_LONG = "too_long"
    NO_LOSS_TOKENS = "no_loss_tokens"
    TEMPLATE_ERROR = "template_error"
    # preference records (preference.py)
    EMPTY_RESPONSE = "empty_response"
    IDENTICAL_RESPONSES = "chosen_equals_rejected"
    PROMPT_NOT_USER_LAST = "prompt_not_ending_with_user"
    GROUP_TOO_LONG = "group_too_long"
    REFERENCE_MISMATCH = "reference_logps_mismatch"
    PROMPT_NOT_SHARED = "prompt_not_shared"


class RecordRejected(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]


def _messages_of(record: dict) -> tuple[list, str, str]:
    """The message list of a record and the keys its messages use for role and content."""
    if "messages" in record:
        return record["messages"], "role", "content"
    if "conversations" in record:
        return record["conversations"], "from", "value"
    raise RecordRejected(
        RejectReason.WRONG_SHAPE,
        'expected a "messages" list of {"role", "content"} (or ShareGPT "conversations" of {"from", "value"}); '
        f"got keys {sorted(record)[:8]}",
    )


def decode_record(raw: bytes) -> dict:
    """One JSONL line as a JSON object, or RecordRejected (bad UTF-8, bad JSON, too deep, not an object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordRejected(RejectReason.INVALID_UTF8, f"byte {e.start}: {e.reason}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordRejected(RejectReason.MALFORMED_JSON, f"column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise RecordRejected(RejectReason.TOO_DEEPLY_NESTED, "JSON nested deeper than the parser's recursion limit") from None
    if not isinstance(record, dict):
        raise RecordRejected(RejectReason.WRONG_SHAPE, f"a record must be a JSON object, got {type(record).__name__}")
    return record


def record_kind(record: dict) -> str | None:
    """CHAT, TEXT, PREFERENCE, or None when the keys are no kind's."""
    if all(k in record for k in PREFERENCE_KEYS):
        return PREFERENCE
    if any(k in record for k in CHAT_KEYS):
        return CHAT
    if "text" in record:
        return TEXT
    return None


def parse_record(raw: bytes) -> Conversation:
    """Decode one JSONL line into a validated Conversation, or raise RecordRejected."""
    return conversation_of(decode_record(raw))


def _check_text(text: str, what: str) -> None:
    """Rejects empty (or whitespace-only) text and lone surrogates, which no UTF-8 tokenizer accepts."""
    if not text.strip():
        raise RecordRejected(RejectReason.EMPTY_CONTENT, f"{what} is empty")
    try:  # JSON can escape lone surrogates (\ud800)
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordRejected(RejectReason.INVALID_UTF8, f"{what} has an unpaired surrogate escape at character "
                             f"{e.start}") from None


def document_of(record: dict) -> str:
    """The text of a text record (a decoded JSON object), validated, or RecordRejected."""
    if "text" not in record:
        raise RecordRejected(RejectReason.WRONG_SHAPE, f'expected a "text" string; got keys {sorted(record)[:8]}')
    text = record["text"]
    if not isinstance(text, str):
        raise RecordRejected(RejectReason.NON_STRING_CONTENT, f"text is {type(text).__name__}, not a string")
    _check_text(text, "text")
    return text


def conversation_of(record: dict) -> Conversation:
    """The validated Conversation of a chat record (a decoded JSON object), or RecordRejected."""
    items, role_key, content_key = _messages_of(record)
    if not isinstance(items, list) or not items:
        raise RecordRejected(RejectReason.WRONG_SHAPE, "the message list must be a non-empty list")

    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise RecordRejected(
                RejectReason.WRONG_SHAPE, f'message {i} must be an object with "{role_key}" and "{content_key}"'
            )
        role = ROLE_ALIASES.get(item[role_key]) if isinstance(item[role_key], str) else None
        if role is None:
            raise RecordRejected(
                RejectReason.UNKNOWN_ROLE,
                f"message {i} has {role_key}={item[role_key]!r}; valid: {sorted(ROLE_ALIASES)}",
            )
        content = item[content_key]
        if not isinstance(content, str):
            raise RecordRejected(
                RejectReason.NON_STRING_CONTENT, f"message {i} {content_key} is {type(content).__name__}, not a string"
            )
        _check_text(content, f"message {i} ({role})")
        messages.append(Message(role, content))

    _check_turn_order(messages)
    return Conversation(tuple(messages))


def _check_turn_order(messages: list[Message]) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise RecordRejected(RejectReason.NO_ASSISTANT_TURN, "the conversation has no assistant message")
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            position = i + (len(messages) - len(turns))
            raise RecordRejected(
                RejectReason.BAD_TURN_ORDER,
                f"message {position} is {m.role}, expected {expected} "
                "(optional system first, then user/assistant alternating, ending with assistant)",
            )
    if turns[-1].role != "assistant":
        raise RecordRejected(RejectReason.BAD_TURN_ORDER, "the conversation ends with a user message")


def input_kind(path: str | Path, max_bytes: int | None = None) -> tuple[str | None, int | None]:
    """The kind of an input file and the line that shows it: its first record that decodes and has a kind's keys
    ((None, None) when no record has: every one will be rejected)."""
    for line_no, raw in enumerate(open_lines(path, max_bytes), start=1):
        if isinstance(raw, OversizedLine) or not raw.strip():
            continue
        try:
            kind = record_kind(decode_record(raw))
        except RecordRejected:
            continue
        if kind is not None:
            return kind, line_no
    return None, None


@dataclass(frozen=True)
class OversizedLine:
    """Stands for a line longer than the limit given to open_lines: never read into memory whole."""

    size: int  # bytes, newline excluded
    limit: int


def open_lines(path: str | Path, max_bytes: int | None = None) -> Iterator[bytes | OversizedLine]:
    """Raw lines (bytes, newline stripped) of a plain or gzip-compressed JSONL file.

    A line of more than `max_bytes` comes as an OversizedLine and is skipped in bounded reads. A truncated or
    corrupt gzip stream is a MegalignError naming the file and the last line read whole.
    """
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    stream_errors = (EOFError, OSError, zlib.error) if gzipped else ()
    line_no = 0
    with opener(path, "rb") as f:
        try:
            while line := f.readline(-1 if max_bytes is None else max_bytes + 1):
                line_no += 1
                if max_bytes is not None and len(line) > max_bytes and not line.endswith(b"\n"):
                    line = _skip_rest(f, line, max_bytes)
                yield line.rstrip(b"\r\n") if isinstance(line, bytes) else line
        except stream_errors as e:
            raise MegalignError(f"{path}: the gzip stream is truncated or corrupt after line {line_no} ({e}); "
                                "re-create or re-download the file") from None


def _skip_rest(f, head: bytes, max_bytes: int) -> bytes | OversizedLine:
    size, rest, first = len(head), head, True
    while rest and not rest.endswith(b"\n"):
        rest = f.readline(1 << 20)
        if first and rest == b"\n" and head.endswith(b"\r"):  # max_bytes exactly, then \r\n
            return head + rest
        first = False
        size += len(rest)
    return OversizedLine(size - rest.endswith(b"\n"), max_bytes)
