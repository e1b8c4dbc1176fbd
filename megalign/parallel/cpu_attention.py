"""The CPU mode's attention kernel for context-parallel chunks (see parallel/context.py): exact, no wasted work.

A CP chunk's c queries attend to their sample's keys up to the chunk's end: the a keys before the chunk without a
mask, then the chunk's own c keys causally (a response of a shared prompt, or its chunk: the prompt's keys and its
own before the chunk are the a keys; parallel/context.py). On CPU, SDPA materialises any explicit or bottom-right mask (O(q x k)
memory), so the chunk is computed as two calls of PyTorch's CPU flash-attention kernels (the ones SDPA runs on
CPU, private aten ops that also return the log-sum-exp), merged by their log-sum-exps as ring attention does. The
backward of each part, given the merged output and log-sum-exp, is that part's exact share of the gradient.

Only the CPU mode uses this (parallel/setup.py `chunk_attention_kernel`); on GPU the varlen kernels handle
bottom-right causality themselves.
"""

from __future__ import annotations

import torch

AVAILABLE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


class _ChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_before, v_before, k_own, v_own, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_own, lse_own = flash(q, k_own, v_own, 0.0, True, scale=scale)
        out_before, lse_before = flash(q, k_before, v_before, 0.0, False, scale=scale)
        lse = torch.logaddexp(lse_before, lse_own)
        out = (torch.exp(lse_before - lse).unsqueeze(-1) * out_before
               + torch.exp(lse_own - lse).unsqueeze(-1) * out_own).to(q.dtype)
        ctx.save_for_backward(q, k_before, v_before, k_own, v_own, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_before, v_before, k_own, v_own, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq_own, dk_own, dv_own = backward(grad_out, q, k_own, v_own, out, lse, 0.0, True, scale=ctx.scale)
        dq_before, dk_before, dv_before = backward(grad_out, q, k_before, v_before, out, lse, 0.0, False,
                                                   scale=ctx.scale)
        return dq_own + dq_before, dk_before, dv_before, dk_own, dv_own, None


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, h, c, d] (a chunk), k/v [1, g, a + c, d] (its sample's keys up to the chunk's end) -> [1, h, c, d]."""
    if k.shape[1] != q.shape[1]:  # GQA: the kernels want one K/V head per query head
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    c = q.shape[2]
    k, v = k.contiguous(), v.contiguous()
    return _ChunkAttention.apply(q.contiguous(), k[:, :, :-c], v[:, :, :-c], k[:, :, -c:], v[:, :, -c:], scale)
