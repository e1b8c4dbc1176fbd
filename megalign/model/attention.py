"""Core attention for packed (THD) batches: one module slot in the layer spec, several backends.

megatron-core's own DotProductAttention refuses packed sequences, so the local layer spec gets one of these
in its `core_attention` slot. Each takes q/k/v as megatron hands them to core attention ([t, heads, dim] for
THD, with cu_seqlens in PackedSeqParams; [s, b, heads, dim] otherwise) and returns [t, heads*dim]
(or [s, b, heads*dim]). No token ever attends across a sequence boundary.

  sdpa   torch scaled_dot_product_attention, causal, one sequence at a time: the reference, runs anywhere
  torch  torch.nn.attention.varlen.varlen_attn (FlashAttention built into PyTorch >= 2.9), CUDA only
  flash  flash-attn's flash_attn_varlen_func, CUDA only
  te     TransformerEngine's DotProductAttention (chosen through TE's own layer spec, see model/build.py)

Under context parallelism (sdpa, torch, flash) each rank holds two chunks of every sample (parallel/context.py);
its keys and values are all-gathered over the CP group and each chunk attends, causally, to its sample's keys
up to the chunk's end, as the batch's `ThdParams.cp_plan` says. TE brings its own CP attention.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megalign.config import ATTENTION_BACKENDS
from megalign.errors import MegalignError
from megalign.parallel import context
from megalign.parallel.setup import chunk_attention_kernel

BACKENDS = ATTENTION_BACKENDS


@dataclass
class ThdParams(PackedSeqParams):
    """megatron's PackedSeqParams for a THD micro-batch, plus what megalign's attention needs from the batch:
    the batch's attention plan (parallel/context.py `attention_plan`: under context parallelism, and for shared
    preference prompts), built on the host with the batch (training/batch.py)."""

    cp_plan: context.AttentionPlan | None = None


class _PackedCoreAttention(MegatronModule):
    """Shared plumbing: constructor signature of megatron's core attention, THD/SBHD dispatch."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.cp = config.context_parallel_size
        self.cp_group = pg_collection.cp if pg_collection is not None else (
            parallel_state.get_context_parallel_group() if self.cp > 1 else None)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by megalign's core attention")
        dropout = self.dropout if self.training else 0.0
        if dropout:  # heads are split over TP ranks: draw dropout from the model-parallel stream, as megatron does
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._forward(query, key, value, packed_seq_params, dropout)
        return self._forward(query, key, value, packed_seq_params, dropout)

    def _forward(self, query, key, value, packed_seq_params, dropout):
        if packed_seq_params is None:  # [s, b, h, d]: every row is one causal sequence
            s, b = query.shape[:2]
            q, k, v = (x.permute(1, 0, 2, 3).reshape(b * s, *x.shape[2:]) for x in (query, key, value))
            if self.cp > 1:
                raise MegalignError("context parallelism needs packed (THD) batches")
            cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
            out = self.attend(q, k, v, cu_seqlens, cu_seqlens, s, s, dropout)
            return out.reshape(b, s, -1).permute(1, 0, 2).contiguous()
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(f"qkv_format {packed_seq_params.qkv_format!r}; megalign packs as 'thd'")
        plan = getattr(packed_seq_params, "cp_plan", None)
        if self.cp > 1 or plan is not None:  # explicit key sets: CP chunks and/or shared prompts
            out = self._planned(query, key, value, plan, dropout)
        else:
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            max_seqlen = packed_seq_params.max_seqlen_q
            out = self.attend(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout)
        return out.reshape(out.shape[0], -1)

    def _planned(self, query, key, value, plan, dropout):
        """Each segment of the plan attends to its key set: under CP the K/V gathered over the CP group (a chunk
        sees its sample's keys up to its own end), a response of a shared prompt its prompt's keys, then its own."""
        if plan is None:
            raise MegalignError("context parallelism needs the batch's attention plan: ThdParams(cp_plan=...), as "
                                "training/batch.py context_parallel_share builds it")
        if self.cp > 1:
            key, value = (context.all_gather_rows(x, self.cp_group) for x in (key, value))
        k, v = key[plan.keys], value[plan.keys]
        return self.attend(query, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, dropout)

    def attend(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout) -> torch.Tensor:
        """q [tq, hq, d], k/v [tk, hkv, d] -> [tq, hq, d]: segment i of q (cu_q) attends to segment i of k/v
        (cu_k), causally with the last query aligned to the last key (bottom-right)."""
        raise NotImplementedError


class SDPAAttention(_PackedCoreAttention):
    """The reference: causal SDPA per sequence (no cross-sequence work, no t x t mask). A CP chunk (fewer queries
    than keys) goes to the exact chunk kernel the device mode provides, if any (parallel/setup.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_kernel = chunk_attention_kernel()

    def attend(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout):
        outputs = []
        for (q0, q1), (k0, k1) in zip(_segments(cu_q), _segments(cu_k)):
            if q1 == q0:
                continue
            qi = q[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            ki, vi = (x[k0:k1].transpose(0, 1).unsqueeze(0) for x in (k, v))
            lead = (k1 - k0) - (q1 - q0)  # > 0: a CP chunk, causal bottom-right
            if lead and not dropout and self.chunk_kernel is not None:
                o = self.chunk_kernel(qi, ki, vi, self.softmax_scale)
            else:
                o = _causal_bottom_right(qi, ki, vi, lead, dropout, self.softmax_scale)
            outputs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)


def _causal_bottom_right(q, k, v, lead: int, dropout: float, scale: float) -> torch.Tensor:
    """SDPA, causal with the last query aligned to the last key. SDPA aligns is_causal top-left and
    materialises any explicit mask (O(queries x keys) memory on CPU), so with fewer queries than keys they go
    last in a row of zero queries: exact, O(keys) memory; the discarded rows cost compute (the chunk kernel of
    the CPU mode avoids them)."""
    if lead:
        q = torch.cat([q.new_zeros(1, q.shape[1], lead, q.shape[3]), q], dim=2)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=True,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return o[:, :, lead:]


def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


class TorchVarlenAttention(_PackedCoreAttention):
    """FlashAttention varlen built into PyTorch (CUDA, bf16/fp16)."""

    def attend(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout):
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        if dropout:
            raise MegalignError("model.attention_backend torch has no attention dropout; set model.attention_dropout: 0")
        # Causality is spelled is_causal=True in some torch releases and window_size=(-1, 0) in others.
        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                causal["enable_gqa"] = True
            else:
                k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        # FlashAttention aligns causality bottom-right when a segment has fewer queries than keys
        return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                           scale=self.softmax_scale, **causal)


class FlashAttnVarlenAttention(_PackedCoreAttention):
    """flash-attn's varlen kernel (CUDA, bf16/fp16)."""

    def attend(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout):
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                                      dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Backends usable in this process, best first."""
    found = []
    if torch.cuda.is_available():
        if _installed("transformer_engine"):
            found.append("te")
        if _installed("flash_attn"):
            found.append("flash")
        if hasattr(torch.nn.attention, "varlen") or _installed("torch.nn.attention.varlen"):
            found.append("torch")
    found.append("sdpa")
    return found


def resolve_backend(name: str) -> str:
    """`auto` -> the best available; an explicit backend that cannot run here is a clear error."""
    if name not in BACKENDS:
        raise MegalignError(f"model.attention_backend {name!r} is unknown; valid: {', '.join(BACKENDS)}")
    available = available_backends()
    if name == "auto":
        return available[0]
    if name not in available:
        raise MegalignError(
            f"model.attention_backend {name} cannot run here (CUDA: {torch.cuda.is_available()}); "
            f"available: {', '.join(available)}"
        )
    return name


CORE_ATTENTION = {"sdpa": SDPAAttention, "torch": TorchVarlenAttention, "flash": FlashAttnVarlenAttention}
