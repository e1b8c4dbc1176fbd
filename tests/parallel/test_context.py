"""How a packed row is cut over context-parallel ranks and put back together (parallel/context.py), the CP share
of a THD batch (training/batch.py), and the CP attention's plan checked against causal attention of the row."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalign.data.packed_dataset import Pack
from megalign.model.attention import SDPAAttention
from megalign.parallel.cpu_attention import chunk_attention
from megalign.parallel import context
from megalign.training.batch import context_parallel_share, thd_batch
from megalign.training.objective import SFT

LENGTHS = [1, 3, 6, 11, 8]  # shorter than 2*cp, not multiples of 2*cp, a multiple


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_every_padded_position_belongs_to_one_rank_and_work_is_balanced(cp):
    padded = context.padded_lengths(LENGTHS, cp)
    assert all(p % (2 * cp) == 0 and p >= n for p, n in zip(padded, LENGTHS))
    shares = [context.rank_index(padded, cp, r) for r in range(cp)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(padded.sum()))
    assert len({len(s) for s in shares}) == 1  # the same number of tokens on every rank
    within = np.arange(padded.sum()) - np.repeat(np.cumsum(padded) - padded, padded)
    causal_work = [int((within[s] + 1).sum()) for s in shares]  # keys each query attends to
    assert len(set(causal_work)) == 1
    order = context.global_order(padded, cp)
    assert np.array_equal(np.concatenate(shares)[order], np.arange(padded.sum()))


def test_padding_index_points_at_the_unpadded_row():
    source = context.padding_index([1, 3], 2)
    assert source.tolist() == [0, -1, -1, -1, 1, 2, 3, -1]


def test_segments_are_each_chunk_against_its_sample_prefix():
    cu_q, cu_k, keys = context.attention_segments(np.array([4, 8]), 2, 1)  # chunks of 1 and 2
    assert cu_q.tolist() == [0, 1, 2, 4, 6]
    assert cu_k.tolist() == [0, 2, 5, 9, 15]
    assert keys.tolist() == [0, 1, 0, 1, 2, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9]


def _pack(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    return Pack(rng.integers(0, 50, n), (rng.random(n) < 0.7).astype(np.uint8), np.array(lengths))


@pytest.mark.parametrize("mode", ["sequence", "token", "pack"])
def test_the_cp_shares_reassemble_the_whole_batch(mode):
    cp = 2
    whole = thd_batch(_pack(LENGTHS), SFT(mode))
    shares = [context_parallel_share(whole, cp, r) for r in range(cp)]
    padded = context.padded_lengths(LENGTHS, cp)
    source = context.padding_index(LENGTHS, cp)
    order = context.global_order(padded, cp)
    def fields(b):
        return {"tokens": b.tokens, "labels": b.labels, "weight": b.loss.per_token["weight"]}

    for field in ("tokens", "labels", "weight"):
        row = torch.cat([fields(s)[field] for s in shares])[order].numpy()
        expected = np.where(source >= 0, fields(whole)[field].numpy()[np.maximum(source, 0)], 0)
        assert np.array_equal(row, expected), field
    weight = sum(float(s.loss.per_token["weight"].sum()) for s in shares)
    assert weight == pytest.approx(float(whole.loss.per_token["weight"].sum()))
    assert [int(s.loss.count) for s in shares] == [int(whole.loss.count), 0]  # counted once over the CP group
    for s in shares:
        assert torch.equal(s.cu_seqlens, whole.cu_seqlens)
        assert s.cu_seqlens_padded.tolist() == [0, *np.cumsum(padded).tolist()]
        positions = s.position_ids.numpy()  # the whole padded row: restart per sample, go on over the padding
        assert np.array_equal(positions, np.concatenate([np.arange(p) for p in padded]))
        assert s.max_seqlen == padded.max()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_cp_attention_equals_causal_attention_of_the_row(kv_heads):
    """Each rank's output rows, computed from its plan and the gathered K/V, equal causal attention per sample;
    so do the gradients (the CPU chunk kernels merge two attentions by their log-sum-exps)."""
    cp, heads, dim = 2, 2, 8
    padded = context.padded_lengths(LENGTHS, cp)
    cu = np.concatenate([[0], np.cumsum(padded)])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(int(padded.sum()), heads, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(int(padded.sum()), kv_heads, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    weights = torch.randn(int(padded.sum()), heads, dim, generator=gen, dtype=torch.float64)

    def grads(outputs_and_rows):
        loss = sum((out * weights[rows]).sum() for out, rows in outputs_and_rows)
        return torch.autograd.grad(loss, (q, k, v))

    for x in (q, k, v):
        x.requires_grad_(True)
    reference = torch.cat([
        F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True,
                                       enable_gqa=kv_heads != heads).transpose(0, 1)
        for a, b in zip(cu[:-1], cu[1:])])
    reference_grads = grads([(reference, slice(None))])
    shares = [context.rank_index(padded, cp, r) for r in range(cp)]
    gathered_k, gathered_v = torch.cat([k[s] for s in shares]), torch.cat([v[s] for s in shares])
    attention = SimpleNamespace(softmax_scale=dim ** -0.5, chunk_kernel=chunk_attention)  # the CPU mode's kernel
    outputs = []
    for rank in range(cp):
        plan = context.attention_plan(np.diff(cu), cp, rank)
        keys, cu_q, cu_k, max_q, max_k = plan.keys, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k
        out = SDPAAttention.attend(attention, q[shares[rank]], gathered_k[keys], gathered_v[keys], cu_q, cu_k,
                                   max_q, max_k, 0.0)
        assert torch.allclose(out, reference[shares[rank]], atol=1e-10)
        outputs.append((out, shares[rank]))
    for got, expected in zip(grads(outputs), reference_grads):
        assert torch.allclose(got, expected, atol=1e-10)
