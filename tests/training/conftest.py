"""Small packed datasets of the example mix, made once per session for the training tests."""

import pytest

from megalign.data import synthetic
from megalign.data.preprocess import PreprocessOptions, preprocess


def _example_dataset(out, tokenizer_dir, seed: int) -> str:
    paths = synthetic.make_example(out, n_long=6, n_short=40, min_words=40, max_words=200, seed=seed)
    opts = PreprocessOptions(inputs=[str(paths["long"]), str(paths["short"])], tokenizer=str(tokenizer_dir),
                             chat_template="chatml", seq_length=1024, output_prefix=str(out / "ds"), progress=False)
    return preprocess(opts).prefix


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, bpe_tokenizer_dir):
    return _example_dataset(tmp_path_factory.mktemp("training_data"), bpe_tokenizer_dir, seed=5)


@pytest.fixture(scope="session")
def other_dataset(tmp_path_factory, bpe_tokenizer_dir):
    """Same tokenizer and shape of data as `dataset`, other samples."""
    return _example_dataset(tmp_path_factory.mktemp("other_training_data"), bpe_tokenizer_dir, seed=6)
