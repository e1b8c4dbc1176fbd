"""A scratch store for tokenized samples between tokenizing and packing.

Packing needs every length before it can place the first sample, so samples are spilled to disk as they come
and read back in pack order with positioned reads (not a memory map, whose pages would stay in the process's
RSS): memory holds lengths and offsets, never the token stream. A store outlives its run when it is a shard's
part (shards.py): `SampleStore.open` reads it back.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np

from megalign.errors import MegalignError


class SampleStore:
    def __init__(self, directory: Path, token_dtype: type):
        self.token_dtype = np.dtype(token_dtype)
        self._tokens_path = directory / "samples.tokens"
        self._mask_path = directory / "samples.mask"
        self._tokens_out = open(self._tokens_path, "wb", buffering=1 << 22)
        self._mask_out = open(self._mask_path, "wb", buffering=1 << 22)
        self._offsets = array("q", [0])  # 8 bytes a sample (a list would take 36)
        self._tokens_fd = self._mask_fd = None

    @classmethod
    def open(cls, directory: Path, token_dtype: type, lengths: np.ndarray) -> "SampleStore":
        """A complete store in `directory` (its samples' `lengths`, in slot order), open for reading."""
        store = cls.__new__(cls)
        store.token_dtype = np.dtype(token_dtype)
        store._tokens_path, store._mask_path = directory / "samples.tokens", directory / "samples.mask"
        store._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        total = int(store._offsets[-1])
        for path, size in ((store._tokens_path, total * store.token_dtype.itemsize), (store._mask_path, total)):
            if not path.is_file() or path.stat().st_size != size:
                raise MegalignError(f"{path} is missing or not {size} bytes: the part is damaged; run that shard again")
        store._tokens_fd = os.open(store._tokens_path, os.O_RDONLY)
        store._mask_fd = os.open(store._mask_path, os.O_RDONLY)
        store._tokens_out = store._mask_out = None
        return store

    def append(self, tokens: np.ndarray, loss_mask: np.ndarray | None) -> int:
        """Store one sample (loss_mask None: all ones); returns its slot."""
        self._tokens_out.write(tokens.astype(self.token_dtype, copy=False).tobytes())
        if loss_mask is None:
            loss_mask = np.ones(len(tokens), dtype=np.uint8)
        self._mask_out.write(loss_mask.astype(np.uint8, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        return len(self._offsets) - 2

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def close_for_reading(self) -> None:
        self._tokens_out.close()
        self._mask_out.close()
        self._offsets = np.frombuffer(self._offsets, dtype=np.int64).copy()
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
            if f is not None and not f.closed:
                f.close()
        for fd in (self._tokens_fd, self._mask_fd):
            if fd is not None:
                os.close(fd)
        self._tokens_fd = self._mask_fd = None
