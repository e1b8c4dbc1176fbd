"""Model arithmetic from a ModelConfig alone: parameter counts and training FLOPs.

FLOPs count attention per sequence (causal, over each sample's own length), never over the whole pack, so
packing does not inflate them.
"""

from __future__ import annotations

from megalign.config import ModelConfig


def parameter_count(m: ModelConfig, vocab_size: int) -> int:
    """Parameters of the full (TP=1, PP=1) model with this vocabulary size."""
    d, groups = m.head_dim, m.query_groups
    qkv_out = (m.num_attention_heads + 2 * groups) * d
    attention = m.hidden_size * qkv_out + m.num_attention_heads * d * m.hidden_size
    attention += qkv_out if (m.add_qkv_bias or m.add_bias_linear) else 0
    attention += m.hidden_size if m.add_bias_linear else 0
    mlp_out = m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)
    mlp = m.hidden_size * mlp_out + m.ffn_hidden_size * m.hidden_size
    mlp += (mlp_out + m.hidden_size) if m.add_bias_linear else 0
    norms_per_norm = m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    layer = attention + mlp + 2 * norms_per_norm
    embeddings = vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * layer + embeddings + norms_per_norm


def dense_flops_per_token(m: ModelConfig, padded_vocab: int) -> float:
    """Forward FLOPs of the matrix multiplies per token (2 x multiply-adds): QKV, output, MLP, logits."""
    head_dim = m.head_dim
    groups = m.query_groups
    qkv = m.hidden_size * head_dim * (m.num_attention_heads + 2 * groups)
    proj = m.num_attention_heads * head_dim * m.hidden_size
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    return 2.0 * (m.num_layers * (qkv + proj + mlp) + m.hidden_size * padded_vocab)


def attention_flops(m: ModelConfig, sequence_lengths) -> float:
    """Forward FLOPs of QK^T and AV for causal attention, summed over sequences: 2 * 2 * n^2/2 * heads * dim."""
    head_dim = m.head_dim
    width = m.num_attention_heads * head_dim
    return m.num_layers * sum(2.0 * n * n * width for n in sequence_lengths)


def step_flops(m: ModelConfig, padded_vocab: int, sequence_lengths) -> float:
    """Training FLOPs of one step (forward + backward = 3 x forward), recomputation not counted."""
    tokens = sum(sequence_lengths)
    return 3.0 * (tokens * dense_flops_per_token(m, padded_vocab) + attention_flops(m, sequence_lengths))
