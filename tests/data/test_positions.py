"""SkipAlign positions: monotone, within the window, skips only where the loss mask switches, drawn per (seed,
pack, epoch), zero skips == contiguous, and the distances they make cover the window (numbers in the asserts)."""


import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megalign.config import Config, load_config, validate
from megalign.data.packed_dataset import Pack
from megalign.data.positions import (contiguous_positions, pack_positions, pack_rng, segment_starts,
                                     skipalign_positions)
from megalign.data.sampler import PackRef, PackSampler
from megalign.errors import MegalignError
from megalign.training.batch import context_parallel_share, thd_batch
from megalign.training.objective import SFT


def chat_pack(rng, n_samples, segments=(1, 6), segment_length=(1, 40)) -> Pack:
    """Samples of alternating prompt (mask 0) / response (mask 1) segments."""
    masks = []
    for _ in range(n_samples):
        k = int(rng.integers(*segments, endpoint=True))
        first = int(rng.integers(0, 2))
        masks.append(np.concatenate([np.full(int(rng.integers(*segment_length, endpoint=True)), (first + i) % 2,
                                             dtype=np.uint8) for i in range(k)]))
    mask = np.concatenate(masks)
    return Pack(rng.integers(0, 1000, len(mask)), mask, np.array([len(m) for m in masks]))


def split(values, lengths):
    return np.split(np.asarray(values), np.cumsum(lengths)[:-1])


def draw(pack, window, seed=0, index=0, epoch=0, fraction=1.0):
    return pack_positions(pack, "skipalign", window, fraction, seed, 0, index, epoch)


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.sampled_from([1, 5, 50, 300, 4096, 65536]))
def test_monotone_from_zero_within_window_skips_only_at_loss_mask_switches(seed, n_samples, window):
    rng = np.random.default_rng(seed)
    pack = chat_pack(rng, n_samples)
    pos = draw(pack, window, seed=seed)
    boundary = segment_starts(pack.loss_mask, pack.lengths)
    assert pos.dtype == np.int64 and pos.shape == pack.tokens.shape
    for p, b, m in zip(split(pos, pack.lengths), split(boundary, pack.lengths), split(pack.loss_mask, pack.lengths)):
        assert p[0] == 0
        step = np.diff(p)
        assert (step >= 1).all()  # strictly increasing
        assert (step[~b[1:]] == 1).all()  # contiguous inside a segment
        assert np.array_equal(b[1:], m[1:] != m[:-1])  # segments are the runs of the loss mask
        if len(p) < window:
            assert p[-1] < window
        else:
            assert np.array_equal(p, np.arange(len(p)))  # not shorter than the window: contiguous


def test_skips_land_on_every_kind_of_switch():
    rng = np.random.default_rng(1)
    pack = chat_pack(rng, 50, segments=(3, 6))
    pos = draw(pack, 65536)
    boundary = segment_starts(pack.loss_mask, pack.lengths)
    skip = np.zeros(len(pos), dtype=bool)
    skip[1:] = np.diff(pos) > 1
    assert skip.sum() > 0.9 * boundary.sum()  # (a skip of 0 at a boundary is allowed, but rare at this window)
    assert not (skip & ~boundary).any()
    up = boundary & (pack.loss_mask == 1)  # prompt -> response
    down = boundary & (pack.loss_mask == 0)  # response -> next prompt
    assert (skip & up).any() and (skip & down).any()


def test_one_boundary_by_hand():
    """Prompt of 2 tokens, response of 2, window 10: positions 0, 1, 2+E, 3+E with E uniform on 0..6 (the last
    position uniform on 3..9)."""
    seen = []
    for pack_index in range(7000):
        pos = skipalign_positions(np.array([0, 0, 1, 1]), [4], 10, pack_rng(0, 0, pack_index, 0))
        e = pos[2] - 2
        assert pos.tolist() == [0, 1, 2 + e, 3 + e]
        seen.append(e)
    counts = np.bincount(seen, minlength=7)
    assert len(counts) == 7 and counts.min() > 850 and counts.max() < 1150  # 1000 each


def test_sample_without_boundary_stays_contiguous():
    pack = Pack(np.arange(30), np.array([0] * 10 + [1] * 10 + [0] * 10, dtype=np.uint8), np.array([10, 10, 10]))
    pos = draw(pack, 65536)
    assert np.array_equal(pos, contiguous_positions([10, 10, 10]))  # no sample has a switch inside it


def test_same_seed_pack_epoch_same_draw_and_each_epoch_draws_anew():
    pack = chat_pack(np.random.default_rng(2), 8)
    a = draw(pack, 65536, seed=3, index=5, epoch=0)
    assert np.array_equal(a, draw(pack, 65536, seed=3, index=5, epoch=0))
    others = [draw(pack, 65536, seed=3, index=5, epoch=1), draw(pack, 65536, seed=3, index=6, epoch=0),
              draw(pack, 65536, seed=4, index=5, epoch=0), pack_positions(pack, "skipalign", 65536, 1.0, 3, 1, 5, 0)]
    for b in others:
        assert not np.array_equal(a, b)


def test_sampler_refs_carry_the_epoch():
    s = PackSampler([3], None, global_batch=3, dp_size=1, seed=0)
    epochs = [[r.epoch for r in s.next_global_batch()] for _ in range(3)]
    assert epochs == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert PackRef(0, 2) == PackRef(0, 2, 0)  # the default keeps old call sites
    assert s.state_dict()["consumed"] == 9 and set(s.state_dict()) == {"consumed", "seed", "num_packs", "weights",
                                                                       "global_batch"}


def test_zero_skips_is_contiguous():
    pack = chat_pack(np.random.default_rng(4), 10)
    assert pack_positions(pack, "contiguous", 65536, 1.0, 0, 0, 0, 0) is None
    contiguous = contiguous_positions(pack.lengths)
    assert np.array_equal(draw(pack, 65536, fraction=0.0), contiguous)
    assert np.array_equal(draw(pack, int(pack.lengths.min())), contiguous)  # window <= every sample's length
    for mode in ("sequence", "token", "pack"):
        plain, zero = thd_batch(pack, SFT(mode)), thd_batch(pack, SFT(mode), draw(pack, 65536, fraction=0.0))
        for key in ("tokens", "labels", "position_ids", "cu_seqlens"):
            a, b = getattr(plain, key), getattr(zero, key)
            assert a.dtype == b.dtype and torch.equal(a, b), key
        for a, b in ((plain.loss.per_token["weight"], zero.loss.per_token["weight"]), (plain.loss.count, zero.loss.count)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert plain.max_seqlen == zero.max_seqlen and plain.num_targets == zero.num_targets


def test_fraction_picks_samples_without_changing_their_draw():
    pack = chat_pack(np.random.default_rng(5), 200, segments=(2, 4))
    full, half = draw(pack, 65536), draw(pack, 65536, fraction=0.5)
    contiguous = contiguous_positions(pack.lengths)
    kinds = [np.array_equal(h, f) or np.array_equal(h, c)
             for h, f, c in zip(split(half, pack.lengths), split(full, pack.lengths), split(contiguous, pack.lengths))]
    assert all(kinds)
    skipped = sum(not np.array_equal(h, c) for h, c in zip(split(half, pack.lengths), split(contiguous, pack.lengths)))
    assert 70 <= skipped <= 130


def coverage(counts):
    """Each bin's count over the mean bin count."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.mean()


def test_distances_cover_the_window():
    """8 bins over [0, W), W = 65536; 60 000 samples of 1-6 segments of 10-40 tokens (pack seeds fixed).

    Measured, each bin over the mean bin:
      span (last - first position) of samples with a boundary: 1.00 1.01 0.99 0.99 0.99 1.02 1.00 1.00 (uniform
        by construction)
      single-turn samples (one boundary), all cross-boundary pairs: 0.96 1.00 0.96 1.04 1.03 1.04 1.01 0.97
      multi-turn samples (2-5 boundaries), first-segment-to-last-segment pairs: 1.02 1.00 1.01 0.98 0.98 1.03
        0.99 0.99
      multi-turn samples, all cross-boundary pairs: 3.04 1.60 1.08 0.78 0.58 0.43 0.29 0.20: they decay toward W,
        as nested distances must (module docstring), but reach the far end of the window.
    """
    window, bins = 65536, np.linspace(0, 65536, 9)
    rng = np.random.default_rng(6)
    spans, single, first_last, cross = [], [], [], []
    for index in range(300):
        pack = chat_pack(rng, 200, segments=(1, 6), segment_length=(10, 40))
        pos = draw(pack, window, seed=7, index=index)
        for p, m in zip(split(pos, pack.lengths), split(pack.loss_mask, pack.lengths)):
            segment = np.concatenate([[0], np.cumsum(m[1:] != m[:-1])])
            if segment[-1] == 0:
                continue
            spans.append(p[-1] - p[0])
            i, j = rng.integers(0, len(p), (2, 20))
            d, differ = np.abs(p[i] - p[j]), segment[i] != segment[j]
            if segment[-1] == 1:
                single.append(d[differ])
            else:
                cross.append(d[differ])
                ends = np.minimum(segment[i], segment[j]) == 0
                ends &= np.maximum(segment[i], segment[j]) == segment[-1]
                first_last.append(d[ends])
    measured = {name: coverage(np.histogram(np.concatenate(x) if name != "span" else x, bins)[0])
                for name, x in (("span", spans), ("single", single), ("first_last", first_last), ("cross", cross))}
    for name in ("span", "single", "first_last"):
        assert measured[name].min() > 0.9 and measured[name].max() < 1.1, (name, measured[name].round(2))
    c = measured["cross"]
    assert (np.diff(c) < 0).all() and c[-1] > 0.1 and c[0] < 4, c.round(2)  # decays, but reaches the far end


def micro_batch(pack, positions="skipalign", fraction=1.0, cp=1, cp_rank=0, epoch=0):
    """The trainer's micro-batch builder (no process groups needed: it is a pure function of the pack reference)."""
    from megalign.config import updated
    from megalign.data.source import InMemoryPacks
    from megalign.training.batch import BatchBuilder

    cfg = updated(Config(), data={"positions": positions, "skipalign_fraction": fraction})
    builder = BatchBuilder([InMemoryPacks([pack, pack], vocab_size=1000)], cfg.data, SFT(cfg.training.loss),
                           cfg.training.seed, cfg.model.max_position_embeddings, 1000, cp, cp_rank)
    return builder.build(PackRef(0, 1, epoch))


def test_trainer_wires_positions_before_the_context_parallel_split():
    pack = chat_pack(np.random.default_rng(8), 6, segments=(2, 5))
    plain, zero = micro_batch(pack, "contiguous"), micro_batch(pack, fraction=0.0)
    assert torch.equal(plain.position_ids, zero.position_ids)
    assert torch.equal(plain.loss.per_token["weight"], zero.loss.per_token["weight"])
    skip = micro_batch(pack)
    expected = pack_positions(pack, "skipalign", Config().model.max_position_embeddings, 1.0, Config().training.seed,
                              0, 1, 0)  # window unset: model.max_position_embeddings
    assert np.array_equal(skip.position_ids.numpy(), expected) and skip.position_ids.max() > plain.position_ids.max()
    assert not torch.equal(micro_batch(pack, epoch=1).position_ids, skip.position_ids)
    for rank in range(2):  # CP: every rank has the whole padded row's positions, the same as splitting by hand
        share = micro_batch(pack, cp=2, cp_rank=rank)
        by_hand = context_parallel_share(thd_batch(pack, SFT("sequence"), expected), 2, rank)
        assert torch.equal(share.position_ids, by_hand.position_ids) and torch.equal(share.tokens, by_hand.tokens)
    real = context_parallel_share(thd_batch(pack, SFT("sequence"), expected), 2, 0)
    assert real.position_ids.numel() == int(real.cu_seqlens_padded[-1])


@pytest.mark.parametrize("overrides, message", [
    (["data.positions=skip"], "data.positions: 'skip' is not one of contiguous, skipalign"),
    (["data.positions=skipalign", "data.skipalign_window=0"], "data.skipalign_window=0 must be in [1, "),
    (["data.positions=skipalign", "data.skipalign_window=8192"], "model.max_position_embeddings=4096]"),
    (["data.skipalign_fraction=1.5"], "data.skipalign_fraction=1.5 must be in [0, 1]"),
])
def test_config_errors_name_the_keys(overrides, message):
    with pytest.raises(MegalignError) as e:
        validate(load_config(None, overrides), world_size=1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_a_window_up_to_max_position_embeddings():
    cfg = load_config(None, ["data.positions=skipalign", "data.skipalign_window=65536",
                             "model.max_position_embeddings=65536"])
    with pytest.raises(MegalignError, match="data.path is missing"):  # got past the position keys
        validate(cfg, world_size=1)
    assert cfg.data.skipalign_window == 65536 and cfg.data.skipalign_fraction == 1.0
    assert load_config(None, []).data.positions == "contiguous"
