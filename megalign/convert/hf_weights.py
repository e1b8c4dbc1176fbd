"""Tensor names and layouts: Hugging Face <-> megatron GPTModel (local spec, TP=1, PP=1).

One table serves both directions. Each `Piece` says which region of a megatron parameter an HF tensor is:
import copies the HF tensor into that region, export reads the region out. Regions of one parameter never
overlap, and together with the vocabulary padding they cover it whole, so a complete import writes every element
exactly once (checked by `Coverage`).

Megatron's layouts, verified against megatron-core 0.16:
- linear_qkv rows are grouped per query group (SelfAttention.get_query_key_value_tensors): for each of the
  G groups, that group's H/G query heads, then its key head, then its value head, each kv_channels rows.
  HF's query head h belongs to key/value head h // (H/G) (repeat_kv), so q_proj viewed as [G, H/G*d, hidden]
  lines up with the groups.
- linear_fc1 holds [gate; up] for swiglu (megatron's glu: silu(first half) * second half); GLM's fused
  gate_up_proj is already [gate; up].
- the vocabulary is padded to make_vocab_size_divisible_by: rows past HF's vocab_size are zero on import and
  dropped on export.
- RoPE needs no permutation: Llama/Mistral/Qwen2 rotate halves (megatron's default), GLM rotates interleaved
  pairs of the first half of each head (megatron's rotary_interleaved with rotary_percent 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megalign.config import ModelConfig
from megalign.convert.hf_config import ARCHITECTURES
from megalign.errors import MegalignError


@dataclass(frozen=True)
class Piece:
    hf: str  # the HF tensor's name
    megatron: str  # the megatron parameter (TP=1/PP=1 name)
    hf_shape: tuple[int, ...]
    region: Callable[[torch.Tensor], torch.Tensor]  # megatron parameter -> a view of the region this HF tensor is


@dataclass(frozen=True)
class Padding:
    megatron: str
    region: Callable[[torch.Tensor], torch.Tensor]  # zero-filled on import, dropped on export


def _whole(p):
    return p


def _rows(start: int, stop: int):
    return lambda p: p[start:stop]


def _grouped(groups: int, start: int, stop: int):
    """Rows start:stop of every group of a [G * n, ...] parameter, as a [G, stop-start, ...] view."""
    return lambda p: p.view(groups, -1, *p.shape[1:])[:, start:stop]


def plan(m: ModelConfig, architecture: str, padded_vocab: int) -> tuple[list[Piece], list[Padding]]:
    """Every HF tensor of `architecture` with the megatron region it maps to, in HF's usual order."""
    model_type = ARCHITECTURES[architecture]
    heads, hidden, ffn, vocab = m.num_attention_heads, m.hidden_size, m.ffn_hidden_size, m.vocab_size
    groups, d = m.query_groups, m.head_dim
    per_group = heads // groups
    q_rows, kv_rows = heads * d, groups * d
    pieces: list[Piece] = []
    padding: list[Padding] = []

    def add(hf, megatron, shape, region=_whole):
        pieces.append(Piece(hf, megatron, tuple(shape), region))

    add("model.embed_tokens.weight", "embedding.word_embeddings.weight", (vocab, hidden), _rows(0, vocab))
    if padded_vocab > vocab:
        padding.append(Padding("embedding.word_embeddings.weight", _rows(vocab, padded_vocab)))
    qkv_bias = m.add_qkv_bias or m.add_bias_linear
    for i in range(m.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        add(hf + "input_layernorm.weight", mg + "input_layernorm.weight", (hidden,))
        qkv = mg + "self_attention.linear_qkv."
        regions = {"q": (0, per_group * d), "k": (per_group * d, (per_group + 1) * d),
                   "v": ((per_group + 1) * d, (per_group + 2) * d)}
        for kind, (a, b) in regions.items():
            rows = q_rows if kind == "q" else kv_rows
            add(f"{hf}self_attn.{kind}_proj.weight", qkv + "weight", (rows, hidden), _grouped(groups, a, b))
            if qkv_bias:
                add(f"{hf}self_attn.{kind}_proj.bias", qkv + "bias", (rows,), _grouped(groups, a, b))
        add(hf + "self_attn.o_proj.weight", mg + "self_attention.linear_proj.weight", (hidden, q_rows))
        if m.add_bias_linear:
            add(hf + "self_attn.o_proj.bias", mg + "self_attention.linear_proj.bias", (hidden,))
        add(hf + "post_attention_layernorm.weight", mg + "pre_mlp_layernorm.weight", (hidden,))
        fc1 = mg + "mlp.linear_fc1."
        if model_type == "glm":
            add(hf + "mlp.gate_up_proj.weight", fc1 + "weight", (2 * ffn, hidden))
        else:
            add(hf + "mlp.gate_proj.weight", fc1 + "weight", (ffn, hidden), _rows(0, ffn))
            add(hf + "mlp.up_proj.weight", fc1 + "weight", (ffn, hidden), _rows(ffn, 2 * ffn))
            if m.add_bias_linear:
                add(hf + "mlp.gate_proj.bias", fc1 + "bias", (ffn,), _rows(0, ffn))
                add(hf + "mlp.up_proj.bias", fc1 + "bias", (ffn,), _rows(ffn, 2 * ffn))
        add(hf + "mlp.down_proj.weight", mg + "mlp.linear_fc2.weight", (hidden, ffn))
        if m.add_bias_linear:
            add(hf + "mlp.down_proj.bias", mg + "mlp.linear_fc2.bias", (hidden,))
    add("model.norm.weight", "decoder.final_layernorm.weight", (hidden,))
    if not m.tie_embeddings:
        add("lm_head.weight", "output_layer.weight", (vocab, hidden), _rows(0, vocab))
        if padded_vocab > vocab:
            padding.append(Padding("output_layer.weight", _rows(vocab, padded_vocab)))
    return pieces, padding


def ignorable(name: str, m: ModelConfig) -> bool:
    """HF tensors that carry no weights of their own: old checkpoints' RoPE buffers, and the copy of the
    embedding some tied checkpoints store as lm_head (transformers ties it to embed_tokens on load)."""
    return name.endswith("rotary_emb.inv_freq") or (m.tie_embeddings and name == "lm_head.weight")


class Coverage:
    """Counts the elements written into each megatron parameter: every region once, every element once."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params
        self.written = {name: 0 for name in params}

    def region(self, name: str, region) -> torch.Tensor:
        if name not in self.params:
            raise MegalignError(f"megatron model has no parameter {name} (mapping and model disagree)")
        view = region(self.params[name])
        self.written[name] += view.numel()
        return view

    def check(self) -> None:
        wrong = [f"{n} ({self.written[n]} of {p.numel()} elements)" for n, p in self.params.items()
                 if self.written[n] != p.numel()]
        if wrong:
            raise MegalignError("import did not write every parameter exactly once: " + ", ".join(wrong[:8]))


def megatron_parameters(model) -> dict[str, torch.Tensor]:
    """The TP=1/PP=1 model's parameters by name (the tied output layer has none of its own)."""
    return {name: p for name, p in model.named_parameters()}
