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

    prefetcher.submit(tuple(refs), build)
    got = prefetcher.take(tuple(refs), lambda: pytest.fail("built again"))
    assert built_on[0].startswith("megalign-prefetch")  # it ran on the worker, not here
    for a, r in zip(got, refs, strict=True):
        _same(a, builder.build(r))
    prefetcher.close()


def test_a_prefetch_for_other_packs_is_not_used():
    builder = _builder()
    prefetcher = Prefetcher("cpu")
    prefetcher.submit((PackRef(0, 0),), lambda: [builder.build(PackRef(0, 0))])
    got = prefetcher.take((PackRef(0, 1),), lambda: [builder.build(PackRef(0, 1))])
    _same(got[0], builder.build(PackRef(0, 1)))
    where = []

    def in_place():
        where.append(threading.current_thread().name)
        return [builder.build(PackRef(0, 0))]

    prefetcher.take((PackRef(0, 0),), in_place)  # the first prefetch was dropped: built here, now
    assert where == [threading.current_thread().name]
    prefetcher.close()


def test_an_error_while_prefetching_is_raised_where_the_batch_is_taken():
    prefetcher = Prefetcher("cpu")

    def damaged():
        raise MegalignError("pack 3: token id 65535 is outside the model's vocabulary")

    prefetcher.submit("step 2", damaged)
    with pytest.raises(MegalignError, match="pack 3"):
        prefetcher.take("step 2", lambda: pytest.fail("built again"))
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
    prefetcher.submit("next", slow)
    started.wait(5)
    threading.Timer(0.2, release.set).start()
    prefetcher.close()  # returns once the build under way has ended; its result is never used
    assert finished == [True]
