"""The pack sampler: epochs reshuffle, DP shares partition the global batch, mixing by weight, exact state."""

from collections import Counter

from megalign.data.sampler import PackSampler


def test_each_epoch_is_a_fresh_permutation():
    s = PackSampler([10], None, global_batch=5, dp_size=1, seed=0)
    epoch0 = [r.pack for _ in range(2) for r in s.next_global_batch()]
    epoch1 = [r.pack for _ in range(2) for r in s.next_global_batch()]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1


def test_dp_shares_partition_the_global_batch():
    s = PackSampler([20], None, global_batch=6, dp_size=3, seed=1)
    batch = s.next_global_batch()
    shares = [s.rank_share(batch, r) for r in range(3)]
    assert all(len(x) == 2 for x in shares) and sum(shares, []) == batch


def test_mixing_follows_the_weights_exactly():
    s = PackSampler([100, 7], [0.75, 0.25], global_batch=8, dp_size=1, seed=2)
    refs = [r for _ in range(50) for r in s.next_global_batch()]
    assert Counter(r.dataset for r in refs) == {0: 300, 1: 100}
    small = [r.pack for r in refs if r.dataset == 1]
    assert sorted(small[:7]) == list(range(7))  # the small set cycles through whole epochs


def test_state_restores_the_stream():
    a = PackSampler([13, 5], [1, 1], global_batch=4, dp_size=2, seed=3)
    for _ in range(3):
        a.next_global_batch()
    b = PackSampler([13, 5], [1, 1], global_batch=4, dp_size=2, seed=3)
    b.load_state_dict(a.state_dict())
    assert [a.next_global_batch() for _ in range(5)] == [b.next_global_batch() for _ in range(5)]
