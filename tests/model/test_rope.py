"""RoPE: every scaling type equals transformers' own rotary embedding, inside the built megatron model; explicit
position ids in a packed (THD) row reach attention token by token, and the default ones change nothing."""

import warnings

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megalign.config import Config, ModelConfig
from megalign.errors import MegalignError
from megalign.model.rope import rope_frequencies

warnings.filterwarnings("ignore", message=".*original_max_position_embeddings.*")

L = 16384  # model.max_position_embeddings; explicit positions go up to L - 1
HEADS, GROUPS, HEAD_DIM = 4, 2, 16

# (ModelConfig keys, HF rope_parameters, HF max_position_embeddings)
SCALINGS = {
    "none": (dict(), dict(rope_type="default", rope_theta=10000.0), L),
    "linear": (dict(rope_scaling="linear", rope_scaling_factor=4.0),
               dict(rope_type="linear", rope_theta=10000.0, factor=4.0), L),
    # HF "dynamic": its max_position_embeddings is the original length; a length-L input rescales the base.
    "ntk": (dict(rope_scaling="ntk", rope_scaling_factor=4.0, rope_original_max_position_embeddings=4096),
            dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0), 4096),
    "yarn": (dict(rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_max_position_embeddings=4096,
                  rope_beta_fast=16.0, rope_beta_slow=2.0),
             dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=4096,
                  beta_fast=16.0, beta_slow=2.0), L),
    "yarn-attention-factor": (
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_position_embeddings=4096,
             rope_attention_factor=1.3),
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=4096,
             attention_factor=1.3), L),
    # not Llama 3.1's (8, 1, 4, 8192): megatron's own llama3 scaling silently ignores all but the factor
    "llama3": (dict(rope_scaling="llama3", rotary_base=500000.0, rope_scaling_factor=32.0, rope_low_freq_factor=2.0,
                    rope_high_freq_factor=8.0, rope_original_max_position_embeddings=4096),
               dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                    original_max_position_embeddings=4096), L),
}
# rotary_percent, rotary_interleaved
FAMILIES = {"llama": (1.0, False), "partial": (0.5, False), "glm": (0.5, True)}
CASES = [(f, s) for f in FAMILIES for s in SCALINGS]


def model_config(family: str, scaling: str, **extra) -> ModelConfig:
    percent, interleaved = FAMILIES[family]
    return ModelConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, ffn_hidden_size=64, num_attention_heads=HEADS,
                       num_query_groups=GROUPS, vocab_size=128, max_position_embeddings=L, rotary_percent=percent,
                       rotary_interleaved=interleaved, **SCALINGS[scaling][0], **extra)


def hf_rotary(family: str, scaling: str):
    """transformers' rotary embedding for the same model (Llama's for full rotary, GLM's for partial)."""
    from transformers import GlmConfig, LlamaConfig
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    percent, _ = FAMILIES[family]
    _, params, hf_max = SCALINGS[scaling]
    shape = dict(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                 head_dim=HEAD_DIM, max_position_embeddings=hf_max)
    if percent == 1.0:
        return LlamaRotaryEmbedding(LlamaConfig(**shape, rope_parameters=dict(params)))
    return GlmRotaryEmbedding(GlmConfig(**shape, rope_parameters=dict(params, partial_rotary_factor=percent)))


def hf_rotate(family: str, q, k, cos, sin):
    """q, k: [b, heads, s, head_dim]; HF's rotation for the family (GLM: interleaved pairs)."""
    if FAMILIES[family][1]:
        from transformers.models.glm.modeling_glm import apply_rotary_pos_emb
    else:  # GPT-NeoX's handles full and partial rotary with rotate-half
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
    return apply_rotary_pos_emb(q, k, cos, sin)


def explicit_positions(lengths, seed=0) -> torch.Tensor:
    """The first sequence counts from 0, the others are strictly increasing with gaps; the last ends at L - 1."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.arange(lengths[0])]
    for n in lengths[1:]:
        parts.append(torch.randperm(L - 1, generator=g)[: n - 1].sort().values)
    parts[-1] = torch.cat([parts[-1], torch.tensor([L - 1])])
    for i in range(1, len(lengths) - 1):
        parts[i] = torch.cat([parts[i], parts[i][-1:] + 1])
    return torch.cat(parts)


def restarting_positions(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


def thd(lengths, device) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths))


# -- frequencies (no model) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,scaling", CASES)
def test_frequencies_equal_transformers(family, scaling):
    m = model_config(family, scaling)
    inv_freq, attention_scaling = rope_frequencies(m)
    hf = hf_rotary(family, scaling)
    if scaling == "ntk":  # HF's dynamic NTK rescales when it sees a length-L input
        hf(torch.zeros(1), torch.tensor([[L - 1]]))
    torch.testing.assert_close(inv_freq, hf.inv_freq, rtol=1e-6, atol=0)
    assert attention_scaling == pytest.approx(hf.attention_scaling, rel=1e-12)
    assert (attention_scaling != 1.0) == scaling.startswith("yarn")


def test_ntk_below_the_original_length_is_plain_rope():
    plain = rope_frequencies(ModelConfig(max_position_embeddings=4096))[0]
    ntk = ModelConfig(max_position_embeddings=4096, rope_scaling="ntk", rope_scaling_factor=4.0)
    assert torch.equal(rope_frequencies(ntk)[0], plain)  # L_orig defaults to L: nothing to extend


# -- the built model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def device():
    """One in-process megatron 'world' (gloo and the CPU mode without CUDA), shut down after this module."""
    from megatron.core import parallel_state

    from megalign.parallel.setup import initialize, shutdown

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if parallel_state.model_parallel_is_initialized():
        yield device
        return
    initialize(Config(), device)
    yield device
    shutdown()


def build(m: ModelConfig, device: str):
    from megalign.model.build import build_model
    from megalign.model.init import initialize_weights

    cfg = Config(model=m)
    model = build_model(cfg, "sdpa")
    initialize_weights(model, seed=7)
    return model.to(device).eval()


def logits(model, tokens, lengths, positions, device):
    with torch.no_grad():
        return model(input_ids=tokens[None].to(device),
                     position_ids=None if positions is None else positions[None].to(device),
                     attention_mask=None, packed_seq_params=thd(lengths, device))[0].cpu()


@pytest.mark.parametrize("family,scaling", CASES)
def test_attention_sees_transformers_rotation(device, family, scaling):
    """q and k as they enter core attention equal HF's rotation of the same q and k at the same positions."""
    model = build(model_config(family, scaling), device)
    attention = model.decoder.layers[0].self_attention
    seen = {}
    projections = attention.get_query_key_value_tensors

    def record_projections(*args, **kwargs):
        q, k, v = projections(*args, **kwargs)
        seen["before"] = q.detach().squeeze(1), k.detach().squeeze(1)  # [t, heads, dim]
        return q, k, v

    attention.get_query_key_value_tensors = record_projections
    attention.core_attention.register_forward_pre_hook(
        lambda module, args: seen.__setitem__("after", (args[0].detach(), args[1].detach())))
    lengths = [7, 9, 5]
    positions = explicit_positions(lengths)
    logits(model, torch.randint(0, 128, (sum(lengths),)), lengths, positions, device)

    cos, sin = hf_rotary(family, scaling)(torch.zeros(1), positions[None])
    heads_first = lambda x: x.cpu().permute(1, 0, 2)[None]  # noqa: E731  [t, h, d] -> [1, h, t, d]
    expected = hf_rotate(family, *(heads_first(x) for x in seen["before"]), cos, sin)
    for got, want in zip(seen["after"], expected):
        torch.testing.assert_close(heads_first(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,scaling", [("llama", "none"), ("glm", "yarn"), ("llama", "llama3")])
def test_restarting_position_ids_are_bit_identical_to_none(device, family, scaling):
    model = build(model_config(family, scaling), device)
    lengths = [5, 12, 1, 8]
    tokens = torch.randint(0, 128, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    default = logits(model, tokens, lengths, None, device)
    assert torch.equal(logits(model, tokens, lengths, restarting_positions(lengths), device), default)


@pytest.mark.parametrize("family,scaling", [("llama", "none"), ("glm", "yarn")])
def test_explicit_positions_in_a_pack_equal_the_sequence_alone(device, family, scaling):
    """Packed [A, B, C] with skipping positions: each sequence's logits are those it gets alone at its positions."""
    model = build(model_config(family, scaling), device)
    lengths = [6, 10, 7]
    tokens = torch.randint(0, 128, (sum(lengths),), generator=torch.Generator().manual_seed(2))
    positions = explicit_positions(lengths, seed=3)
    assert positions[6:16].diff().min() >= 1 and positions[6:16].diff().max() > 1  # B: increasing, with gaps
    packed = logits(model, tokens, lengths, positions, device)
    start = 0
    for n in lengths:
        alone = logits(model, tokens[start:start + n], [n], positions[start:start + n], device)
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n
    # not vacuous: B at its own positions differs from B at 0, 1, ...
    b = slice(6, 16)
    assert not torch.allclose(packed[b], logits(model, tokens[b], [10], None, device), atol=1e-3)


def test_only_relative_positions_matter(device):
    """RoPE: shifting every position of a sequence by the same amount leaves its logits unchanged."""
    model = build(model_config("llama", "none"), device)
    tokens = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([0, 3, 4, 9, 10, 11, 40, 41, 42, 100, 101, 150])
    base = logits(model, tokens, [12], positions, device)
    torch.testing.assert_close(logits(model, tokens, [12], positions + 500, device), base, rtol=1e-4, atol=1e-4)


def test_position_ids_must_cover_the_packed_row(device):
    model = build(model_config("llama", "none"), device)
    with pytest.raises(MegalignError, match=r"position_ids must be \[1, 9\]"):
        logits(model, torch.zeros(9, dtype=torch.long), [4, 5], torch.arange(8), device)
