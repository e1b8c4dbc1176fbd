"""The prefetcher: exactly the batches of the plain path, built ahead on a background thread; a prefetch for
other packs is not used; a build's error is raised where the batch is taken; close() with a build under way."""

import threading

import numpy as np
import pytest
import torch

from megalign.config import Config
from megalign.data.packed_dataset import Pack
from megalign.data.sampler import PackRef
from megalign.data.source import InMemoryPacks
from megalign.errors import MegalignError
from megalign.training.batch import BatchBuilder
from megalign.training.objective import SFT
from megalign.training.prefetch import Prefetcher
from tests.training.test_trainer_parts import packs

VOCAB = 50


def _builder(cp: int = 1, cp_rank: int = 0, tp: int = 1) -> BatchBuilder:
    rng = np.random.default_rng(0)
    packs = []
    for lengths in ([5, 9, 2], [16], [3, 3, 3, 4]):
        n = sum(lengths)
        packs.append(Pack(rng.integers(0, VOCAB, n), (rng.random(n) < 0.6).astype(np.uint8), np.array(lengths)))
    return BatchBuilder([InMemoryPacks(packs, vocab_size=VOCAB, name="p")], Config().data, SFT(), 0, 4096, VOCAB,
                        cp=cp, cp_rank=cp_rank, sequence_parallel_tp=tp)


def _same(a, b) -> None:
    assert a.max_seqlen == b.max_seqlen and a.num_targets == b.num_targets
    for x, y in zip(a.__dict__.values(), b.__dict__.values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
    for k in a.loss.per_token:
        assert torch.equal(a.loss.per_token[k], b.loss.per_token[k])
    assert torch.equal(a.loss.count, b.loss.count)
    assert (a.cp_plan is None) == (b.cp_plan is None)
    if a.cp_plan is not None:
        for x, y in zip(a.cp_plan.__dict__.values(), b.cp_plan.__dict__.values()):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.parametrize("cp,tp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_prefetched_batches_are_the_plain_paths(cp, tp):
    builder = _builder(cp=cp, tp=tp)
    refs = [PackRef(0, k) for k in (2, 0, 1)]
    prefetcher = Prefetcher("cpu")
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return [builder.build(r) for r in refs]

    prefetcher.submit(builder, tuple(refs), build)
    got = prefetcher.take(builder, tuple(refs), lambda: pytest.fail("built again"))
    assert built_on[0].startswith("megalign-prefetch")  # it ran on the worker, not here
    for a, r in zip(got, refs, strict=True):
        _same(a, builder.build(r))
    prefetcher.close()


def test_a_prefetch_for_other_packs_is_not_used():
    builder = _builder()
    prefetcher = Prefetcher("cpu")
    prefetcher.submit(builder, (PackRef(0, 0),), lambda: [builder.build(PackRef(0, 0))])
    got = prefetcher.take(builder, (PackRef(0, 1),), lambda: [builder.build(PackRef(0, 1))])
    _same(got[0], builder.build(PackRef(0, 1)))
    where = []

    def in_place():
        where.append(threading.current_thread().name)
        return [builder.build(PackRef(0, 0))]

    prefetcher.take(builder, (PackRef(0, 0),), in_place)  # the first prefetch was dropped: built here, now
    assert where == [threading.current_thread().name]
    prefetcher.close()


def test_an_error_while_prefetching_is_raised_where_the_batch_is_taken():
    prefetcher = Prefetcher("cpu")

    def damaged():
        raise MegalignError("pack 3: token id 65535 is outside the model's vocabulary")

    prefetcher.submit(None, "step 2", damaged)
    with pytest.raises(MegalignError, match="pack 3"):
        prefetcher.take(None, "step 2", lambda: pytest.fail("built again"))
    prefetcher.close()


def test_close_waits_for_a_build_under_way_and_drops_it():
    started, release = threading.Event(), threading.Event()
    finished = []

    def slow():
        started.set()
        release.wait(5)
        finished.append(True)
        return []

    prefetcher = Prefetcher("cpu")
    prefetcher.submit(None, "next", slow)
    started.wait(5)
    threading.Timer(0.2, release.set).start()
    prefetcher.close()  # returns once the build under way has ended; its result is never used
    assert finished == [True]


class SlowPacks:
    """In-memory packs whose reads take a while (a disk), one of which can signal this process as it is read:
    a SIGTERM that lands while the worker thread is prefetching."""

    def __init__(self, packs, signal_at: int | None = None):
        self.packs, self.signal_at, self.reads = packs, signal_at, []

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, k):
        import os
        import signal
        import time

        self.reads.append((k, threading.current_thread().name))
        if self.signal_at is not None and len(self.reads) == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the main thread goes on meanwhile
        return self.packs[k]

    def __getattr__(self, name):  # pack_sample_lengths, vocab_size, fingerprint
        return getattr(self.packs, name)


@pytest.fixture(scope="module")
def runtime():
    from megatron.core import parallel_state

    from megalign.config import updated
    from megalign.parallel.setup import initialize, shutdown

    if parallel_state.model_parallel_is_initialized():
        shutdown()
    yield initialize(updated(Config(), run={"device": "cpu"}))
    shutdown()


def _trainer(runtime, tmp_path, dataset, prefetch: bool):
    from megalign.config import updated
    from megalign.training.trainer import Trainer

    cfg = updated(Config(), model={"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                                   "num_query_groups": 2},
                  data={"prefetch": prefetch, "positions": "skipalign"},
                  training={"global_batch": 2, "steps": 5, "lr": 1e-2, "warmup_fraction": 0},
                  run={"device": "cpu", "output_dir": str(tmp_path)}, checkpoint={"resume": False})
    return Trainer(cfg, datasets=[dataset], runtime=runtime)


def test_a_prefetch_is_taken_only_by_the_builder_that_asked_for_it():
    """Same packs, another builder (another objective): not taken, even when the asker was freed and the new
    builder could reuse its id (the bug this guards against: the layout tests' per-mode builders)."""
    first, other = _builder(), _builder().replace(objective=SFT("token"))
    prefetcher = Prefetcher("cpu")
    refs = (PackRef(0, 0),)
    prefetcher.submit(first, refs, lambda: [first.build(refs[0])])
    got = prefetcher.take(other, refs, lambda: [other.build(refs[0])])
    _same(got[0], other.build(refs[0]))
    prefetcher.close()


def test_training_with_prefetch_is_training_without(runtime, tmp_path):
    data = packs(8, seed=1)
    plain = _trainer(runtime, tmp_path / "plain", SlowPacks(data), prefetch=False)
    ahead_data = SlowPacks(data)
    ahead = _trainer(runtime, tmp_path / "ahead", ahead_data, prefetch=True)
    for _ in range(5):
        a, b = plain.train_step(), ahead.train_step()
        assert (a.loss, a.grad_norm, a.sequences) == (b.loss, b.grad_norm, b.sequences)
    workers = [name for _, name in ahead_data.reads if name.startswith("megalign-prefetch")]
    assert len(workers) == 4 * 2  # steps 2-5 were read ahead, 2 packs each; step 1 in place
    ahead.close()


def test_a_sigterm_while_prefetching_stops_after_the_step_and_loses_nothing(runtime, tmp_path):
    """The signal lands while the worker reads step 3's packs (during step 2): step 2 ends normally, the ranks
    agree to stop, close() returns; continuing gives the steps of a run never signalled."""
    from megalign.checkpoint.preemption import PreemptionWatch

    data = packs(8, seed=1)
    reference = _trainer(runtime, tmp_path / "reference", SlowPacks(data), prefetch=False)
    expected = [reference.train_step() for _ in range(5)]
    signalled = SlowPacks(data, signal_at=5)  # reads: step 1 (2, in place), step 2 (2, ahead), step 3's first
    trainer = _trainer(runtime, tmp_path / "signalled", signalled, prefetch=True)
    with PreemptionWatch() as watch:
        got = [trainer.train_step(), trainer.train_step()]
        for _ in range(500):  # on a loaded machine the worker may not have reached the read yet
            if len(signalled.reads) >= 5:
                break
            threading.Event().wait(0.01)
        assert watch.agreed() and watch.signal_name == "SIGTERM"
    assert signalled.reads[4][1].startswith("megalign-prefetch")
    trainer.close()  # the build under way is waited for and dropped
    got += [trainer.train_step() for _ in range(3)]  # as a resumed run would: in place, the same packs
    assert [(r.loss, r.grad_norm) for r in got] == [(r.loss, r.grad_norm) for r in expected]


def test_per_step_builders_with_prefetch_train_as_without(runtime, tmp_path):
    """A new builder every step (another objective each time, as the layout tests step): each step's
    micro-batches are its own builder's, so the losses are those of the plain path."""
    data = packs(8, seed=1)
    plain = _trainer(runtime, tmp_path / "plain", data, prefetch=False)
    ahead = _trainer(runtime, tmp_path / "ahead", data, prefetch=True)
    for mode in ("sequence", "token", "pack", "token", "sequence"):
        a = plain.train_step(plain.batches.replace(objective=SFT(mode)))
        b = ahead.train_step(ahead.batches.replace(objective=SFT(mode)))
        assert (a.loss, a.grad_norm) == (b.loss, b.grad_norm), mode
    ahead.close()
