"""Compute-balanced data parallelism (training/balance.py): the shares partition the global batch evenly, never
lose to consecutive shares, depend on nothing but the global batch (every rank, every resume), bring a long-context
mix near 1.0; and the global batch's loss and gradients are those of the unbalanced split."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megalign.config import Config, ModelConfig, resolve, updated
from megalign.data.packed_dataset import Pack
from megalign.data.sampler import PackSampler, dp_share
from megalign.data.source import InMemoryPacks
from megalign.training.balance import (DataParallelBalance, balanced_shares, consecutive_shares, imbalance,
                                       pack_cost, run_order)

VOCAB = 300
MODEL = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2}


def llama2_7b() -> ModelConfig:
    from megalign.model.presets import preset

    return resolve(Config(model=dataclasses.replace(ModelConfig(), **preset("llama2-7b")))).model


def mixed_packs(n: int, seed: int = 0, size: int = 64) -> InMemoryPacks:
    """Packs of `size` tokens: some one long sample, some many short ones (so their costs differ)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pieces = int(rng.choice([1, 2, 4, 8]))
        lengths = np.full(pieces, size // pieces)
        out.append(Pack(rng.integers(0, VOCAB, size), (rng.random(size) < 0.6).astype(np.uint8), lengths))
    return InMemoryPacks(out, vocab_size=VOCAB)


# -- the split ----------------------------------------------------------------------------------------------------
@given(st.integers(1, 8), st.integers(1, 6), st.data())
def test_shares_partition_the_batch_evenly_and_never_lose_to_consecutive_shares(dp, per_rank, data):
    costs = data.draw(st.lists(st.floats(0.1, 10.0), min_size=dp * per_rank, max_size=dp * per_rank))
    shares = balanced_shares(costs, dp)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert all(len(s) == per_rank for s in shares)  # every rank runs the same number of micro-batches
    assert imbalance(costs, shares) <= imbalance(costs, consecutive_shares(len(costs), dp)) + 1e-12
    assert all(s == run_order(s, costs) for s in shares)


def test_two_packs_per_rank_pair_the_costliest_with_the_cheapest():
    shares = balanced_shares([8, 1, 7, 2, 6, 3, 5, 4], 4)  # the optimum: every rank 9
    assert imbalance([8, 1, 7, 2, 6, 3, 5, 4], shares) == 1.0


def test_a_rank_runs_its_cheapest_pack_first_then_the_others_by_decreasing_cost():
    costs = [3.0, 9.0, 1.0, 5.0, 9.0]
    assert run_order([0, 1, 2, 3, 4], costs) == [2, 1, 4, 3, 0]  # ties keep the global batch's order


def test_a_pack_of_one_64k_sample_costs_about_twice_a_pack_of_short_ones():
    model = llama2_7b()
    assert 2.0 < pack_cost(model, [65536]) / pack_cost(model, [1024] * 64) < 2.5


def test_none_is_the_consecutive_split_and_reports_its_imbalance():
    data = mixed_packs(12)
    refs = PackSampler([len(data)], None, 12, 3, seed=4).next_global_batch()
    model = resolve(updated(Config(), model=MODEL), VOCAB).model
    done = DataParallelBalance(model, "none").assign(refs, [data], 3)
    assert done.shares == [dp_share(refs, 3, r) for r in range(3)]
    costs = [pack_cost(model, data.pack_sample_lengths(r.pack)) for r in refs]
    assert done.imbalance == imbalance(costs, consecutive_shares(12, 3)) > 1.0


def test_the_split_depends_only_on_the_global_batch_on_every_rank_and_after_resume():
    data = mixed_packs(40, seed=1)
    model = resolve(updated(Config(), model=MODEL), VOCAB).model
    run = PackSampler([len(data)], None, 8, 4, seed=7)
    warm = DataParallelBalance(model, "compute")  # a rank that has split earlier batches (its cache is warm)
    for _ in range(3):
        warm.assign(run.next_global_batch(), [data], 4)
    resumed = PackSampler([len(data)], None, 8, 4, seed=7)
    resumed.load_state_dict(run.state_dict())  # what a checkpoint restores: the position in the stream
    for _ in range(6):  # past the epoch boundary (40 packs): the reshuffled packs keep their costs
        refs = run.next_global_batch()
        assert resumed.next_global_batch() == refs
        fresh = DataParallelBalance(model, "compute").assign(refs, [data], 4)
        assert warm.assign(refs, [data], 4) == fresh


def test_balancing_a_long_context_mix_at_64k_for_a_7b_model():
    """bench/dp_balance.py in miniature: LongAlign-like lengths, bfd at 64k, DP=8 with 4 packs per rank."""
    from megalign.data.packing import pack

    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.exp(rng.uniform(np.log(8192), np.log(65536), 1000)),
                              np.clip(rng.lognormal(np.log(300), 1.0, 6000), 16, 8192)]).astype(np.int64)
    model = llama2_7b()
    costs = np.array([pack_cost(model, lengths[p]) for p in pack(lengths, 65536, "bfd", seed=0)])
    sampler = PackSampler([len(costs)], None, 32, 8, seed=0)
    none, compute = [], []
    for _ in range(20):
        step = costs[[r.pack for r in sampler.next_global_batch()]]
        none.append(imbalance(step, consecutive_shares(32, 8)))
        compute.append(imbalance(step, balanced_shares(step, 8)))
    assert np.median(compute) <= 1.02 < np.median(none)
    assert all(c <= n for c, n in zip(compute, none))


def test_the_layout_tests_dp2_global_batch_is_really_rebalanced(dataset):
    """test_layouts.py's dp=2 launches (global batch 2, the default seed, data.balance=compute by default) compare
    their loss and gradient norm with one process: some of their steps split otherwise than `none` does."""
    from megalign.data.packed_dataset import PackedDataset

    ds = PackedDataset(dataset)
    model = resolve(updated(Config(), model=MODEL), ds.vocab_size).model
    sampler = PackSampler([len(ds)], None, 2, 2, seed=Config().training.seed)
    balance = DataParallelBalance(model, "compute")
    steps = [sampler.next_global_batch() for _ in range(3)]
    assert any(balance.assign(refs, [ds], 2).shares != [dp_share(refs, 2, r) for r in range(2)] for refs in steps)


# -- the loss does not change --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from megatron.core import parallel_state

    from megalign.parallel.setup import shutdown
    from megalign.training.trainer import Trainer

    if parallel_state.model_parallel_is_initialized():
        shutdown()  # another module's world; this one builds its own
    cfg = updated(Config(), model=MODEL, training={"global_batch": 4, "steps": 4, "lr": 1e-2, "warmup_fraction": 0},
                  run={"device": "cpu", "output_dir": str(tmp_path_factory.mktemp("run"))})
    built = Trainer(cfg, datasets=[mixed_packs(16, seed=2)])
    yield built
    shutdown()


@pytest.mark.parametrize("dp", [2, 4])
def test_a_balanced_global_batch_has_the_unbalanced_loss(trainer, dp):
    """DP ranks emulated in one process: each share through the trainer's schedule (forward only), the sums added
    as the all-reduce adds them. Each pack's sums are the same whichever rank runs it, and float64 adds a few fp32
    sums exactly, so the two splits agree to the last bit here (asserted to 1e-12: the order of the additions may
    differ)."""
    refs = trainer.sampler.packs_at(0, 4)
    losses = {}
    for mode in ("none", "compute"):
        shares = DataParallelBalance(trainer.cfg.model, mode).assign(refs, trainer.datasets, dp).shares
        losses[mode] = trainer.objective.metrics(sum(trainer.forward_sums(s, True, trainer.batches) for s in shares))
        if mode == "compute":
            assert shares != [dp_share(refs, dp, r) for r in range(dp)]  # the balanced split really differs
    assert losses["compute"]["loss"] == pytest.approx(losses["none"]["loss"], rel=1e-12)
    assert losses["none"]["loss"] == pytest.approx(trainer.forward_backward(refs, forward_only=True)["loss"], rel=1e-12)


def test_the_order_of_a_ranks_packs_changes_neither_loss_nor_gradients(trainer):
    """One rank, its micro-batches in the sampler's order (none) and in the balanced run order (compute): the same
    loss, and the gradient norm to fp32 accumulation order (the gradients are summed in another order)."""
    refs = trainer.sampler.packs_at(4, 4)
    found = {}
    kept = trainer.balance
    try:
        for mode in ("none", "compute"):
            trainer.balance = DataParallelBalance(trainer.cfg.model, mode)
            loss = trainer.forward_backward(refs)["loss"]
            found[mode] = (loss, trainer.gradient_norm())
            trainer.zero_grad()
        assert trainer.balance.assign(refs, trainer.datasets, 1).shares[0] != list(refs)  # really reordered
    finally:
        trainer.balance = kept
    assert found["compute"][0] == pytest.approx(found["none"][0], rel=1e-12)
    assert found["compute"][1] == pytest.approx(found["none"][1], rel=1e-5)


def test_every_step_reports_its_modelled_imbalance(trainer):
    from megalign.training.loop import metrics_record

    result = trainer.train_step()
    assert result.dp_imbalance == 1.0  # one DP rank: nothing to wait for
    assert metrics_record(result, 1)["dp_imbalance"] == 1.0
