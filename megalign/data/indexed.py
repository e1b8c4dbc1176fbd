"""megatron-core's IndexedDataset files (PREFIX.bin + PREFIX.idx), written without importing megatron-core.

megatron-core imports torch (about 2.5 s and 300 MB of a preprocessing run, which needs neither), and its
IndexedDatasetBuilder keeps a Python list entry per sequence and computes the byte offsets in a Python loop.
This writer produces the same bytes (tests/data/test_indexed.py compares them with megatron's builder, so a
change of the format upstream fails there), with the index held in 8-byte arrays.

The .idx layout (megatron/core/datasets/indexed_dataset.py, _IndexWriter): the header b"MMIDIDX\\x00\\x00", the
version (u64 1), the dtype code (u8), the number of sequences and of document boundaries (u64 each), then the
sequence lengths (int32), the byte offset of each sequence in .bin (int64) and the document boundaries (int64,
starting at 0). The .bin is the sequences' values, concatenated.
"""

from __future__ import annotations

import struct
from array import array

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.dtype(t): code for t, code in ((np.uint8, 1), (np.int8, 2), (np.int16, 3), (np.int32, 4),
                                                (np.int64, 5), (np.float64, 6), (np.float32, 7), (np.uint16, 8))}


def optimal_token_dtype(vocab_size: int) -> type:
    """megatron's DType.optimal_dtype: uint16 for a vocabulary below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedWriter:
    """Write an IndexedDataset at `prefix` document by document (for megalign: a document is a pack, its sequences
    the pack's samples); `finalize` writes the index."""

    def __init__(self, prefix: str, dtype: type, buffering: int = 1 << 22):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"IndexedDataset has no dtype {self.dtype}; valid: {', '.join(map(str, DTYPE_CODES))}")
        self._bin = open(prefix + ".bin", "wb", buffering=buffering)
        self._lengths = array("q")
        self._documents = array("q", [0])

    def add_document(self, values: np.ndarray, lengths) -> None:
        self._bin.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self._lengths.extend(lengths)
        self._documents.append(len(self._lengths))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if len(self._lengths) else np.zeros(0, np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        documents = np.frombuffer(self._documents, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents)))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(documents.astype("<i8").tobytes())
