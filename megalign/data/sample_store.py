"""A scratch store for tokenized samples between tokenizing and packing.

Packing needs every length before it can place the first sample, so samples are spilled to disk as they come
and read back (memory-mapped) in pack order: memory holds lengths and offsets, never the token stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class SampleStore:
    def __init__(self, directory: Path, token_dtype: type):
        self.token_dtype = np.dtype(token_dtype)
        self._tokens_path = directory / "samples.tokens"
        self._mask_path = directory / "samples.mask"
        self._tokens_out = open(self._tokens_path, "wb", buffering=1 << 22)
        self._mask_out = open(self._mask_path, "wb", buffering=1 << 22)
        self._offsets = [0]
        self._tokens = self._mask = None

    def append(self, tokens: np.ndarray, loss_mask: np.ndarray) -> int:
        """Store one sample; returns its slot."""
        self._tokens_out.write(tokens.astype(self.token_dtype, copy=False).tobytes())
        self._mask_out.write(loss_mask.astype(np.uint8, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        return len(self._offsets) - 2

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def close_for_reading(self) -> None:
        self._tokens_out.close()
        self._mask_out.close()
        self._offsets = np.asarray(self._offsets, dtype=np.int64)
        if self._offsets[-1] > 0:
            self._tokens = np.memmap(self._tokens_path, dtype=self.token_dtype, mode="r")
            self._mask = np.memmap(self._mask_path, dtype=np.uint8, mode="r")

    def get(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self._offsets[slot], self._offsets[slot + 1]
        return self._tokens[start:end], self._mask[start:end]

    def close(self) -> None:
        for f in (self._tokens_out, self._mask_out):
            if not f.closed:
                f.close()
        self._tokens = self._mask = None
