"""A small packed dataset of the example mix, made once per session for the training tests."""

import pytest

from megalign.data import synthetic
from megalign.data.preprocess import PreprocessOptions, preprocess


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, bpe_tokenizer_dir):
    out = tmp_path_factory.mktemp("training_data")
    paths = synthetic.make_example(out, n_long=6, n_short=40, min_words=40, max_words=200, seed=5)
    opts = PreprocessOptions(inputs=[str(paths["long"]), str(paths["short"])], tokenizer=str(bpe_tokenizer_dir),
                             chat_template="chatml", seq_length=1024, output_prefix=str(out / "ds"), progress=False)
    return preprocess(opts).prefix


@pytest.fixture(scope="session")
def other_dataset(tmp_path_factory, bpe_tokenizer_dir):
    """Same tokenizer and shape of data as `dataset`, other samples."""
    out = tmp_path_factory.mktemp("other_training_data")
    paths = synthetic.make_example(out, n_long=6, n_short=40, min_words=40, max_words=200, seed=6)
    opts = PreprocessOptions(inputs=[str(paths["long"]), str(paths["short"])], tokenizer=str(bpe_tokenizer_dir),
                             chat_template="chatml", seq_length=1024, output_prefix=str(out / "ds"), progress=False)
    return preprocess(opts).prefix
