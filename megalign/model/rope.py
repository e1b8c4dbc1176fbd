"""Rotary position embeddings that match Hugging Face's, read at explicit per-token positions.

Three pieces, one path for every scaling type:

  rope_frequencies(model)      (inv_freq, attention_scaling) as HF computes them for the same config
  megatron_compat.set_rope_attention_scaling(config, s)  makes megatron's attention multiply cos and
                               sin by s (YaRN)
  rotary_embedding_at(...)     the rotation angles of given position ids, in megatron's layout
  GPTModelWithPositions        a GPTModel that installs those frequencies and, when the batch carries
                               position_ids, rotates token t by the angle position_ids[t] * inv_freq

Why not megatron's own scalings: its llama3 scaling ignores low/high_freq_factor and the original length
(always 1, 4, 8192; rotary_pos_embedding.py `_apply_scaling` is called with the factor only), its linear
scaling divides the positions instead of inv_freq (not bit-equal to HF), it has no dynamic NTK, and its
YarnRotaryEmbedding takes the full head as the rotary dimension (wrong with partial rotary), refuses interleaved
pairs and needs MLA's config fields. Here megatron's RotaryEmbedding is kept, its inv_freq replaced.

Why per-token positions work without touching attention: megatron's THD RoPE (rope_utils.py,
`_apply_rotary_pos_emb_thd`) takes a rotary embedding as long as the whole packed row (freqs.size(0) ==
cu_seqlens[-1]) as one angle per token ("exact mapping"); any shorter one is read from 0 again for every sequence.
So an embedding built from position_ids, [T, 1, 1, dim], reaches every token as given. With context
parallelism the same holds for the whole (unsplit) row: megatron cuts that embedding per sequence into the
2*CP chunks the tokens were cut into (`_get_thd_freqs_on_this_cp_rank`); so under CP, pass the position ids
of the whole padded row (cu_seqlens_padded[-1] of them), not of this rank's share, as
training/batch.py `context_parallel_share` does.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from megalign import megatron_compat
from megalign.config import ModelConfig
from megalign.errors import MegalignError


def rotary_dim(m: ModelConfig) -> int:
    """The rotated part of each head (megatron and HF: int(head_dim * rotary_percent))."""
    return int(m.head_dim * m.rotary_percent)


def rope_frequencies(m: ModelConfig) -> tuple[Tensor, float]:
    """(inv_freq [rotary_dim/2] fp32, attention_scaling): what HF's rotary embedding computes for this config.

    The HF rope_type of each model.rope_scaling, with the same floating-point steps as
    transformers/modeling_rope_utils.py so that cos/sin agree bit for bit on CPU:

      none    default RoPE: inv_freq_i = 1 / base^(2i/dim)
      linear  inv_freq / factor (HF "linear"; positions / factor in the original paper)
      ntk     HF "dynamic" NTK, evaluated once at L = max_position_embeddings: if L > L_orig
              (rope_original_max_position_embeddings, None: L), the base becomes
              base * (factor * L / L_orig - (factor - 1)) ^ (dim / (dim - 2)), else it is unchanged.
              HF recomputes this for every forward from the longest position it sees, which is fine for
              generation but would make a training step's frequencies depend on the batch. Fixed at L, training
              sees the frequencies HF uses at a full-length context. The new base is computed as HF's dynamic
              update does at run time (float32 tensor arithmetic), so a HF model whose config has
              max_position_embeddings = L_orig and rope_type "dynamic" matches ours on a length-L input exactly.
      yarn    HF "yarn" (truncated correction range), beta_fast/beta_slow, L_orig; attention_scaling is
              rope_attention_factor, or HF's default 0.1 * ln(factor) + 1 (1 when factor <= 1).
      llama3  HF "llama3" with factor, low/high_freq_factor and L_orig (Llama 3.1's: 8, 1, 4, 8192).

    attention_scaling multiplies cos and sin (so q.k by its square); it is 1 except for yarn.
    """
    dim = rotary_dim(m)
    kind, factor = m.rope_scaling, m.rope_scaling_factor
    original = m.rope_original_max_position_embeddings or m.max_position_embeddings
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    base = m.rotary_base
    if kind == "ntk" and m.max_position_embeddings > original:
        if dim <= 2:
            raise MegalignError(f"config key model.rope_scaling=ntk needs a rotary dimension > 2, got {dim}")
        length = torch.tensor(m.max_position_embeddings)  # a tensor, as in HF's run-time update
        base = base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
    powers = base ** exponents
    inv_freq = 1.0 / powers
    if kind in ("none", "ntk"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, factor, m.rope_low_freq_factor, m.rope_high_freq_factor, original), 1.0
    if kind == "yarn":
        return _yarn(powers, dim, m.rotary_base, factor, m.rope_beta_fast, m.rope_beta_slow, original), \
            _yarn_attention_scaling(factor, m.rope_attention_factor)
    raise MegalignError(f"config key model.rope_scaling: {kind!r} is not one of none, linear, ntk, yarn, llama3")


def _llama3(inv_freq: Tensor, factor: float, low: float, high: float, original: int) -> Tensor:
    """Frequencies with a wavelength above original/low are divided by factor, below original/high kept, and
    interpolated between the two in between (Llama 3.1)."""
    wavelen = 2 * math.pi / inv_freq
    long_wavelen, short_wavelen = original / low, original / high
    scaled = torch.where(wavelen > long_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < short_wavelen) * ~(wavelen > long_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(powers: Tensor, dim: int, base: float, factor: float, beta_fast: float, beta_slow: float,
          original: int) -> Tensor:
    """Dimensions that turn more than beta_fast times over L_orig keep their frequency, fewer than beta_slow
    times are interpolated (divided by factor), with a linear ramp between (YaRN, Peng et al. 2023).
    `powers` is base^(2i/dim)."""

    def dim_turning(turns: float) -> float:  # the dimension whose wavelength fits `turns` times into L_orig
        return (dim * math.log(original / (turns * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(dim_turning(beta_fast)), 0)
    high = min(math.ceil(dim_turning(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    return 1.0 / (factor * powers) * (1 - keep) + 1.0 / powers * keep


def _yarn_attention_scaling(factor: float, attention_factor: float | None) -> float:
    if attention_factor is not None:
        return float(attention_factor)
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


# -- per-token rotary embedding ------------------------------------------------------------------------------
def rotary_embedding_at(inv_freq: Tensor, position_ids: Tensor, interleaved: bool) -> Tensor:
    """Rotation angles for position_ids [b, s] as megatron's attention takes them: [s, b, 1, rotary_dim].

    Same layout and arithmetic as megatron's RotaryEmbedding.get_emb (angles repeated for the two halves,
    or pairwise when interleaved), so contiguous positions give bit-identical angles.
    """
    freqs = position_ids.t().to(device=inv_freq.device, dtype=inv_freq.dtype)[..., None] * inv_freq
    if interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


class GPTModelWithPositions(GPTModel):
    """megatron's GPTModel with HF-exact RoPE frequencies and RoPE at explicit position ids (overrides the private
    `_preprocess` of megatron-core 0.16: listed in megatron_compat.py, with canaries).

    forward(..., position_ids=P): token t of the packed row is rotated by P[0, t] (THD: P is [1, T] over the
    whole packed row, T = cu_seqlens[-1]; SBHD: P is [b, s]). position_ids=None keeps megatron's own RoPE:
    positions 0.. restarting at every sequence of cu_seqlens. Positions restarting at 0 per sequence give
    bit-identical results either way. Generation (an inference_context) always uses megatron's path.
    """

    def __init__(self, config, *args, rope_model: ModelConfig, **kwargs):
        inv_freq, scaling = rope_frequencies(rope_model)
        megatron_compat.set_rope_attention_scaling(config, scaling)  # before the layers read this config
        super().__init__(config, *args, **kwargs)
        rotary = self.rotary_pos_emb
        if rotary.inv_freq.shape != inv_freq.shape:
            raise AssertionError(f"rotary dim: megatron {tuple(rotary.inv_freq.shape)}, ours {tuple(inv_freq.shape)}")
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        rotary.forward.cache_clear()  # its lru_cache must not hold angles from the old frequencies

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params,
                                  padding_mask=padding_mask)
        default = out[1]
        if position_ids is None or inference_context is not None or default is None:
            return out
        if self.config.apply_rope_fusion:
            raise MegalignError("explicit position ids need the unfused RoPE (apply_rope_fusion=False)")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            total = int((cu if cu is not None else packed_seq_params.cu_seqlens_q)[-1])
            if position_ids.shape != (1, total):
                raise MegalignError(f"position_ids must be [1, {total}] (one per token of the packed row), "
                                    f"got {list(position_ids.shape)}")
        elif self.config.context_parallel_size > 1:
            raise MegalignError("explicit position ids with context parallelism need a THD batch")
        emb = rotary_embedding_at(self.rotary_pos_emb.inv_freq.to(default.device), position_ids,
                                  self.config.rotary_interleaved)
        return (out[0], emb, *out[2:])
