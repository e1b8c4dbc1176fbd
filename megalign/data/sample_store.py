"""A scratch store for tokenized samples between tokenizing and packing.

Packing needs every length before it can place the first sample, so samples are spilled to disk as they come
and read back in pack order with positioned reads (not a memory map, whose pages would stay in the process's
RSS): memory holds lengths and offsets, never the token stream.
"""

from __future__ import annotations

import os
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
        self._tokens_fd = self._mask_fd = None

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
        self._tokens_fd = os.open(self._tokens_path, os.O_RDONLY)
        self._mask_fd = os.open(self._mask_path, os.O_RDONLY)

    def get(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self._offsets[slot]), int(self._offsets[slot + 1])
        size = self.token_dtype.itemsize
        tokens = np.frombuffer(os.pread(self._tokens_fd, (end - start) * size, start * size), dtype=self.token_dtype)
        mask = np.frombuffer(os.pread(self._mask_fd, end - start, start), dtype=np.uint8)
        return tokens, mask

    def close(self) -> None:
        for f in (self._tokens_out, self._mask_out):
            if not f.closed:
                f.close()
        for fd in (self._tokens_fd, self._mask_fd):
            if fd is not None:
                os.close(fd)
        self._tokens_fd = self._mask_fd = None
