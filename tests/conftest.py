"""Shared fixtures: tokenizers built offline by the tests themselves (never downloaded)."""

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import settings

# Same examples on every run: a CI failure is reproducible, never a coin toss.
settings.register_profile("megalign", derandomize=True, deadline=None, max_examples=100)
settings.load_profile("megalign")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = [
    "<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
]
WORDS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", " ", "\n", "system", "user", "assistant",
         "be", "brief", "hi", "hello", "bye", "ok"]


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer.json with a fixed vocabulary: every id is known, so golden tests read plainly.

    Whitespace characters are tokens of their own; special tokens have ids 0..14, words 15.. in WORDS order.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from megalign.data.tokenizer_training import CHATML_JINJA

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    out = tmp_path_factory.mktemp("word_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML_JINJA}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with a ChatML chat_template) trained here."""
    from megalign.data import synthetic
    from megalign.data.tokenizer_training import train_bpe_tokenizer

    return train_bpe_tokenizer(synthetic.corpus(seed=0, n_words=5000), tmp_path_factory.mktemp("bpe"), vocab_size=600)


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory):
    """A SentencePiece .model trained here, with the chat templates' special tokens as user-defined symbols."""
    import sentencepiece as spm

    from megalign.data import synthetic

    out = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    sentences = [synthetic.filler(rng, 40) for _ in range(300)]
    specials = [s for s in SPECIALS if s not in ("<unk>", "<s>", "</s>")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(out / "sp"), vocab_size=300,
        user_defined_symbols=specials + ["[INST]", "[/INST]"], model_type="bpe", minloglevel=2,
    )
    return out / "sp.model"


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only where CUDA is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small packed datasets of the example mix, made once per session (training and launch tests).
def _example_dataset(out, tokenizer_dir, seed: int) -> str:
    from megalign.data import synthetic
    from megalign.data.preprocess import PreprocessOptions, preprocess

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


@pytest.fixture(scope="session")
def tiny_hf_model(bpe_tokenizer_dir, tmp_path_factory):
    """A random 2-layer Llama with the test BPE tokenizer (ChatML chat_template), saved as a HF directory."""
    import shutil

    import torch
    import transformers

    out = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for f in Path(bpe_tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out
