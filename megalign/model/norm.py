"""The norms of the local (plain PyTorch) layer spec, usable under sequence parallelism.

megatron's WrappedTorchNorm refuses sequence parallelism (it asserts), though nothing in a norm depends on the
whole sequence: each token is normalised alone. What SP needs is that the norm's weight, replicated on every TP
rank but applied to a different slice of tokens on each, gets the sum of the ranks' gradients: megatron's
finalize_model_grads all-reduces over TP every parameter marked `sequence_parallel`. This module is that
WrappedTorchNorm with its parameters marked; without SP it builds the same torch module, so the weights, their
names and every result are those of megatron's own.
"""

from __future__ import annotations

import torch

NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelTorchNorm:
    """Called as megatron builds a norm (build_module(spec, config=, hidden_size=, eps=)): a torch LayerNorm or
    RMSNorm whose parameters carry `sequence_parallel` = config.sequence_parallel."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("the torch norms have no zero-centred gamma, persistent or memory-efficient variant")
        if config.normalization not in NORMS:
            raise ValueError(f"normalization {config.normalization!r}: the local spec has {', '.join(NORMS)}")
        norm = NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for parameter in norm.parameters():
            parameter.sequence_parallel = config.sequence_parallel
        return norm
