"""Haystack text for the long-context probes (needle.py, ruler.py): filler text, sentence boundaries, token
spans, and the search for the largest haystack whose prompt fits a token budget.

Every token count comes from the model's own tokenizer, without special tokens (megalign.data.tokenizer).
"""

from __future__ import annotations

import bisect
import functools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from megalign.data import synthetic
from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError

# RULER's noise haystack: one unit, repeated.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# A sentence ends at . ! or ? (and any closing quotes or brackets) followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)")


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode_batch([text])[0])


def token_spans(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and each token's character span in it."""
    try:
        return tokenizer.encode_with_offsets(text)
    except NotImplementedError:
        pass
    # megalign's SentencePiece wrapper gives no offsets: its processor does, as UTF-8 byte spans
    processor = getattr(tokenizer, "_sp", None)
    if processor is None:
        raise MegalignError(f"tokenizer {tokenizer.path} gives no token offsets, which the haystack needs")
    try:
        pieces = processor.encode(text, return_type="proto").pieces
    except TypeError:  # sentencepiece before return_type
        pieces = processor.encode(text, out_type="immutable_proto").pieces
    ids = [p.id for p in pieces]
    if text.isascii():
        return ids, [(p.begin, p.end) for p in pieces]
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    utf8_lengths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    char_at_byte = np.append(np.repeat(np.arange(len(text)), utf8_lengths), len(text))
    return ids, [(int(char_at_byte[p.begin]), int(char_at_byte[p.end])) for p in pieces]


@functools.lru_cache(maxsize=8)  # parsing a SentencePiece model per context would cost more than its encoding
def special_ids(tokenizer: Tokenizer) -> dict[int, str]:
    """Ids the tokenizer produces for special tokens that plain text can spell (e.g. '<s>'), with their text."""
    texts = {tokenizer.bos_token, tokenizer.eos_token, *tokenizer.special_tokens_map.values()}
    # the wrappers do not list their added tokens, which both kinds match anywhere in plain text
    rust = getattr(tokenizer, "_tok", None)
    if rust is not None:
        texts |= {t.content for t in rust.get_added_tokens_decoder().values() if t.special}
    processor = getattr(tokenizer, "_sp", None)
    if processor is not None:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(processor.serialized_model_proto())
        kinds = (model.SentencePiece.CONTROL, model.SentencePiece.USER_DEFINED)
        texts |= {p.piece for p in model.pieces if p.type in kinds}
    found = {}
    for text in sorted(t for t in texts if t):
        try:
            found[tokenizer.special_id(text)] = text
        except MegalignError:
            pass
    return found


def sentence_ends(text: str) -> list[int]:
    """Character positions just after each sentence's closing punctuation, ascending."""
    return [m.end() for m in _SENTENCE_END.finditer(text)]


def read_text_files(paths: list[str]) -> str:
    """The files' text, each stripped, joined by blank lines."""
    parts = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise MegalignError(f"cannot read haystack file {path}: {e}") from None
        if not text:
            raise MegalignError(f"haystack file {path} is empty")
        parts.append(text)
    if not parts:
        raise MegalignError("no haystack files given")
    return "\n\n".join(parts)


def synthetic_haystack(tokenizer: Tokenizer, min_tokens: int, seed: int = 0) -> str:
    """Filler paragraphs (megalign.data.synthetic) until the text has at least `min_tokens` tokens.

    One paragraph stream per seed: a longer haystack starts with the shorter one.
    """
    rng = random.Random(seed)
    paragraphs: list[str] = []
    while True:
        # estimate from what we have, then verify on the whole text (joins can merge tokens)
        have = count_tokens(tokenizer, "\n".join(paragraphs)) if paragraphs else 0
        if have >= min_tokens:
            return "\n".join(paragraphs)
        per_paragraph = have / len(paragraphs) if paragraphs else None
        more = 1 if per_paragraph is None else max(1, math.ceil((min_tokens - have) / per_paragraph * 1.05))
        paragraphs += [synthetic.filler(rng, 200) for _ in range(more)]


@dataclass(frozen=True)
class EncodedText:
    """A text encoded once: its tokens' spans and its sentence boundaries, for cutting at token boundaries."""

    text: str
    ids: list[int]
    spans: list[tuple[int, int]]
    sentence_ends: list[int]
    token_ends: list[int]

    @classmethod
    def of(cls, tokenizer: Tokenizer, text: str) -> "EncodedText":
        ids, spans = token_spans(tokenizer, text)
        spans = [tuple(s) for s in spans]
        return cls(text, list(ids), spans, sentence_ends(text), [end for _, end in spans])

    def token_at(self, char: int) -> int:
        """Index of the first token that ends after `char` (the one holding it)."""
        return bisect.bisect_right(self.token_ends, char)

    def next_non_space(self, char: int) -> int:
        while char < len(self.text) and self.text[char].isspace():
            char += 1
        return char

    def cut_after(self, n_tokens: int) -> int:
        """Character position just after the first `n_tokens` tokens."""
        return self.spans[n_tokens - 1][1] if n_tokens > 0 else 0

    def sentence_end_at_or_before(self, char: int) -> int:
        """The last sentence boundary at or before `char` (0, the start, when there is none)."""
        i = bisect.bisect_right(self.sentence_ends, char)
        return self.sentence_ends[i - 1] if i else 0


def largest_fitting(fits: Callable[[int], bool], lowest: int, guess: int, step: int = 1) -> int | None:
    """The largest n >= lowest with fits(n), for fits true up to some n and false after (None: not even lowest).

    Starts from `guess` and gallops outwards from `step` until it brackets the answer, then bisects: a good
    guess (the previous item's answer, step 1) costs two or three calls.
    """
    if not fits(lowest):
        return None
    guess, step = max(guess, lowest), max(1, step)
    if fits(guess):
        good, bad = guess, guess + step
        while fits(bad):
            step *= 2
            good, bad = bad, bad + step
    else:
        good, bad = max(lowest, guess - step), guess
        while not fits(good):
            step *= 2
            good, bad = max(lowest, good - step), good
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
