"""Core attention backends for THD: the sdpa reference against an explicit block-diagonal causal softmax,
and (on CUDA) every installed GPU backend against sdpa."""

import math

import numpy as np
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megalign.model.attention import CORE_ATTENTION, SDPAAttention, available_backends, resolve_backend
from megalign.errors import MegalignError

HEADS, GROUPS, DIM = 4, 2, 8
LENGTHS = [5, 1, 9, 3]


def config():
    return TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                             use_cpu_initialization=True)


def thd_inputs(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    q = torch.randn(t, HEADS, DIM, generator=g).to(device, dtype)
    k = torch.randn(t, GROUPS, DIM, generator=g).to(device, dtype)
    v = torch.randn(t, GROUPS, DIM, generator=g).to(device, dtype)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device=device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(LENGTHS),
                             max_seqlen_kv=max(LENGTHS))
    return q, k, v, params


def reference(q, k, v, lengths):
    """softmax(QK^T / sqrt(d) + block-diagonal causal mask) V, written out."""
    t = q.shape[0]
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t)
    allowed = (sample[:, None] == sample[None, :]) & (pos[None, :] <= pos[:, None])
    k, v = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, -1)


def test_sdpa_is_block_diagonal_causal_attention():
    q, k, v, params = thd_inputs()
    attention = SDPAAttention(config(), 1, AttnMaskType.causal, "self")
    out = attention(q, k, v, None, packed_seq_params=params)
    assert out.shape == (sum(LENGTHS), HEADS * DIM)
    torch.testing.assert_close(out, reference(q, k, v, LENGTHS), rtol=1e-5, atol=1e-6)


def test_sbhd_rows_are_independent_causal_sequences():
    q, k, v, _ = thd_inputs()
    s = 6
    rows = [x[: 2 * s].reshape(2, s, *x.shape[1:]).transpose(0, 1) for x in (q, k, v)]  # [s, b=2, h, d]
    out = SDPAAttention(config(), 1, AttnMaskType.causal, "self")(*rows, None)
    expected = reference(q[: 2 * s], k[: 2 * s], v[: 2 * s], [s, s]).reshape(2, s, -1).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_backend_choice():
    assert resolve_backend("sdpa") == "sdpa"
    assert resolve_backend("auto") == available_backends()[0]
    if not torch.cuda.is_available():
        assert available_backends() == ["sdpa"]
        with pytest.raises(MegalignError, match="model.attention_backend flash cannot run here"):
            resolve_backend("flash")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "flash"])
def test_gpu_backend_matches_sdpa(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    q, k, v, params = thd_inputs("cuda", torch.bfloat16)
    cfg = config()
    expected = SDPAAttention(cfg, 1, AttnMaskType.causal, "self")(q.float(), k.float(), v.float(), None,
                                                                    packed_seq_params=params)
    got = CORE_ATTENTION[backend](cfg, 1, AttnMaskType.causal, "self")(q, k, v, None, packed_seq_params=params)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "flash"])
def test_gpu_backend_context_parallel_chunks_match_sdpa(backend):
    """The CP segments (a chunk's queries against its sample's keys up to the chunk's end: fewer queries than
    keys, causal aligned bottom-right) through each varlen kernel, against sdpa."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    from megalign.parallel.context import attention_plan

    g = torch.Generator().manual_seed(1)
    cp, padded = 2, [8, 4, 12]  # sample lengths padded to multiples of 2*cp
    plan = attention_plan(np.array(padded), cp, 1)
    keys, cu_q, cu_k, max_q, max_k = plan.keys, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k
    q = torch.randn(int(cu_q[-1]), HEADS, DIM, generator=g)
    k, v = (torch.randn(sum(padded), GROUPS, DIM, generator=g)[keys] for _ in range(2))
    cfg = config()
    expected = SDPAAttention(cfg, 1, AttnMaskType.causal, "self").attend(q, k, v, cu_q, cu_k, max_q, max_k, 0.0)
    got = CORE_ATTENTION[backend](cfg, 1, AttnMaskType.causal, "self").attend(
        *(x.to("cuda", torch.bfloat16) for x in (q, k, v)), cu_q.cuda(), cu_k.cuda(), max_q, max_k, 0.0)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=2e-2, atol=2e-2)
