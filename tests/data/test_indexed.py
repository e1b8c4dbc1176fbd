"""megalign writes megatron-core's IndexedDataset files itself (no torch import while preprocessing): the bytes
must be those of megatron's own IndexedDatasetBuilder, and megatron's reader must read them back."""

import numpy as np
import pytest

from megalign.data.indexed import IndexedWriter, optimal_token_dtype


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_the_files_are_megatrons_byte_for_byte(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    documents = [rng.integers(1, 300, size=rng.integers(1, 6)) for _ in range(40)]  # sequence lengths per document
    ours, theirs = IndexedWriter(str(tmp_path / "ours"), dtype), IndexedDatasetBuilder(str(tmp_path / "theirs.bin"),
                                                                                       dtype=dtype)
    for lengths in documents:
        values = rng.integers(0, 250, size=int(lengths.sum())).astype(dtype)
        ours.add_document(values, lengths.tolist())
        theirs.add_document(values, lengths.tolist())
    ours.finalize()
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()
    read = IndexedDataset(str(tmp_path / "ours"))
    assert len(read) == sum(map(len, documents)) and len(read.document_indices) == len(documents) + 1


def test_the_token_dtype_is_megatrons_rule():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (600, 65499, 65500, 128256):
        assert optimal_token_dtype(vocab) == DType.optimal_dtype(vocab)
