"""A Trainer built from in-memory parts, in this process, through its public interface only: the resolved config,
forward-only evaluation, another objective on the same packs, and a refused dataset."""

import dataclasses

import numpy as np
import pytest
import torch

from megalign.config import Config, updated
from megalign.data.packed_dataset import Pack
from megalign.data.source import InMemoryPacks, PackSource
from megalign.training.objective import SFT

VOCAB = 300
MODEL = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2}


def packs(n: int = 4, seed: int = 0) -> InMemoryPacks:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(5, 60, size=rng.integers(1, 5))
        total = int(lengths.sum())
        out.append(Pack(rng.integers(0, VOCAB, total), (rng.random(total) < 0.6).astype(np.uint8), lengths))
    return InMemoryPacks(out, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from megatron.core import parallel_state

    from megalign.parallel.setup import shutdown
    from megalign.training.trainer import Trainer

    if parallel_state.model_parallel_is_initialized():
        shutdown()  # another module's world; this one builds its own
    cfg = updated(Config(), model=MODEL, training={"global_batch": 2, "steps": 4, "lr": 1e-2, "warmup_fraction": 0},
                  run={"device": "cpu", "output_dir": str(tmp_path_factory.mktemp("run"))})
    built = Trainer(cfg, datasets=[packs()])
    yield built
    shutdown()


def test_the_config_is_resolved_once_and_frozen(trainer):
    m = trainer.cfg.model
    assert (m.vocab_size, m.num_query_groups, m.kv_channels, m.padded_vocab_size) == (VOCAB, 2, 8, 384)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.cfg.training.loss = "token"
    assert Config().model.vocab_size is None  # the defaults were not touched


def test_forward_only_is_the_training_forward_without_changing_anything(trainer):
    refs = trainer.sampler.packs_at(trainer.sampler.consumed, trainer.sampler.global_batch)
    before = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}
    first = trainer.forward_backward(refs, forward_only=True)["loss"]
    again = trainer.forward_backward(refs, forward_only=True)["loss"]
    assert first == again and np.isfinite(first)
    assert all(torch.equal(before[n], p) for n, p in trainer.model.module.named_parameters())
    step = trainer.train_step()  # the same packs, now with the update
    assert step.step == 1 and step.loss == pytest.approx(first, rel=1e-6)
    assert not all(torch.equal(before[n], p) for n, p in trainer.model.module.named_parameters())
    assert trainer.forward_backward(refs, forward_only=True)["loss"] < first  # lr 1e-2 on the same packs


def test_another_objective_on_the_same_packs(trainer):
    refs = trainer.sampler.packs_at(0, trainer.sampler.global_batch)
    sequence = trainer.forward_backward(refs, forward_only=True)["loss"]
    token = trainer.forward_backward(refs, forward_only=True, batches=trainer.batches.replace(objective=SFT("token")))
    assert token["loss"] != pytest.approx(sequence, rel=1e-4)  # the weighting differs: the packs mix lengths
    assert trainer.objective == SFT("sequence")  # the run's own objective is untouched


def test_the_dataset_interface_is_checked():
    from megalign.training.trainer import Trainer

    assert isinstance(packs(), PackSource)
    with pytest.raises(TypeError, match="PackSource"):
        Trainer(Config(), datasets=[[Pack(np.zeros(2), np.ones(2, np.uint8), np.array([2]))]])


def test_token_ids_beyond_the_vocabulary_are_refused_before_training_and_per_pack(dataset):
    from megalign.data.packed_dataset import PackedDataset
    from megalign.data.sampler import PackRef
    from megalign.errors import MegalignError
    from megalign.training.batch import BatchBuilder
    from megalign.training.trainer import Trainer

    ds = PackedDataset(dataset)
    assert ds.max_token_id == max(int(ds[k].tokens.max()) for k in range(len(ds)))  # recorded at preprocessing
    with pytest.raises(MegalignError, match=r"holds token ids up to \d+, beyond the model's vocabulary of 100"):
        Trainer(updated(Config(), model={"vocab_size": 100}), datasets=[ds])  # before any process group
    damaged = InMemoryPacks([Pack(np.array([1, 2, 65535]), np.array([0, 1, 1], np.uint8), np.array([3]))], VOCAB)
    builder = BatchBuilder([damaged], Config().data, SFT(), 0, 4096, VOCAB)
    with pytest.raises(MegalignError, match="pack 0: token id 65535 is outside the model's vocabulary of 300"):
        builder.build(PackRef(0, 0))
