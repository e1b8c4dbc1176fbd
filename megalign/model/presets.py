"""Model shapes of the families megalign aligns, with the released models' RoPE settings. A preset fills
`model.*`; keys set in the config win."""

from __future__ import annotations

from megalign.errors import MegalignError

PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2),
    "llama2-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                      vocab_size=32000, norm_epsilon=1e-5, rotary_base=10000.0, max_position_embeddings=4096),
    "llama2-13b": dict(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                       vocab_size=32000, norm_epsilon=1e-5, rotary_base=10000.0, max_position_embeddings=4096),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=128256, norm_epsilon=1e-5, rotary_base=500000.0,
                      max_position_embeddings=8192),
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                        num_query_groups=8, vocab_size=128256, norm_epsilon=1e-5, rotary_base=500000.0,
                        max_position_embeddings=131072, tie_embeddings=True, rope_scaling="llama3",
                        rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_position_embeddings=8192),
    "qwen2-7b": dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                     num_query_groups=4, vocab_size=152064, norm_epsilon=1e-6, rotary_base=1000000.0,
                     add_qkv_bias=True, max_position_embeddings=32768),
    "chatglm3-6b": dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32,
                        num_query_groups=2, vocab_size=65024, norm_epsilon=1e-5, rotary_base=10000.0,
                        rotary_percent=0.5, rotary_interleaved=True, add_qkv_bias=True,
                        max_position_embeddings=8192),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise MegalignError(f"config key model.preset: {name!r} is unknown; valid: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
