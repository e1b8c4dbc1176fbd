"""Text records -> documents: BOS + the text's tokens + EOS, loss on every token, cut into pack-length pieces.

BOS and EOS are the tokenizer's own (`bos_token` / `eos_token` of tokenizer_config.json, or the SentencePiece
model's); a tokenizer without one gets none at that end. EOS is a target, so the model learns where documents end.

The loss mask of a document is 1 on every token. The first token of every sample (the BOS, or the first token of
a later piece) is still never a target: the batch builder gives no sample's first token a label, because nothing
in its sample precedes it. An all-ones mask also leaves SkipAlign (data.positions=skipalign) nothing to skip
at: it finds segments where the loss mask switches, so text samples keep contiguous positions under it.

A document longer than the pack is cut into pieces of exactly `piece_length` tokens, the last one shorter (its
tail). Each piece is a sample of its own, so attention never crosses a document boundary, nor a piece boundary
(document masking). A tail shorter than `min_piece_length` is dropped (and counted). Every piece has a position
offset: 0 for restarting positions, or k * piece_length for piece k (`positions` continue), where its positions
start.
"""

from __future__ import annotations

import numpy as np

from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError

POSITION_MODES = ("restart", "continue")


class DocumentEncoder:
    """Tokenizes documents in one batched tokenizer call; BOS and EOS placed by id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bos_id = self._special_id(tokenizer.bos_token, "BOS")
        self.eos_id = self._special_id(tokenizer.eos_token, "EOS")

    def _special_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        try:
            return self.tokenizer.special_id(token)
        except MegalignError:
            raise MegalignError(f"tokenizer {self.tokenizer.path} names {token!r} as its {what} token but has no such "
                                f"token; fix its tokenizer_config.json") from None

    def describe(self) -> dict:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id}

    def encode_many(self, texts: list[str], dtype) -> list[np.ndarray]:
        """Token ids of each document, BOS and EOS included, as arrays of `dtype` (the dataset's token dtype)."""
        head, tail = int(self.bos_id is not None), int(self.eos_id is not None)
        documents = []
        for ids in self.tokenizer.iter_encode_batch(texts):
            tokens = np.empty(head + len(ids) + tail, dtype=dtype)
            tokens[head:head + len(ids)] = ids
            if head:
                tokens[0] = self.bos_id
            if tail:
                tokens[-1] = self.eos_id
            documents.append(tokens)
        return documents


def piece_lengths(length: int, piece_length: int, min_piece_length: int) -> tuple[list[int], int]:
    """How a document of `length` tokens is cut: the lengths of its pieces, and the tokens of a dropped tail."""
    whole, tail = divmod(length, piece_length)
    pieces = [piece_length] * whole
    if tail >= min_piece_length or (tail and not whole):  # a short document is kept whole (its own minimum: 2)
        return pieces + [tail], 0
    return pieces, tail

