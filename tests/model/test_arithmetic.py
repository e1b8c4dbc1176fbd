"""The presets against the released models: parameter counts, and every model key (RoPE included) against what
the import of the released config.json gives; FLOPs per sequence."""

import pytest

from megalign.config import ModelConfig
from megalign.model.arithmetic import attention_flops, dense_flops_per_token, parameter_count
from megalign.model.presets import PRESETS

PUBLISHED = {  # parameters of the released checkpoints
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "qwen2-7b": 7_615_616_512,
    "chatglm3-6b": 6_243_584_000,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(name):
    m = ModelConfig(**PRESETS[name])
    assert parameter_count(m, m.vocab_size) == PUBLISHED[name]


# The released models' config.json values (the keys that shape the model and its RoPE), typed from the model cards'
# files: the import maps them to model.* keys, which must equal the preset's.
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
         "mlp_bias": False, "initializer_range": 0.02}
RELEASED_CONFIGS = {
    "llama2-7b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "llama3-8b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "llama3.2-1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                    "tie_word_embeddings": True,
                    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen2-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                 "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "max_position_embeddings": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
                 "initializer_range": 0.02},
}


@pytest.mark.parametrize("name", sorted(RELEASED_CONFIGS))
def test_presets_equal_the_released_configs(name):
    from dataclasses import asdict

    from megalign.convert.hf_config import hf_to_model_config

    imported, _ = hf_to_model_config(RELEASED_CONFIGS[name])
    preset = ModelConfig(**PRESETS[name])
    not_the_models = {"preset", "attention_backend", "recompute", "attention_dropout", "hidden_dropout",
                      "num_query_groups", "kv_channels"}  # the last two: compared as derived values below
    differ = {k: (v, getattr(imported, k)) for k, v in asdict(preset).items()
              if k not in not_the_models and getattr(imported, k) != v}
    assert differ == {}, differ  # preset value, released value
    assert (preset.query_groups, preset.head_dim) == (imported.query_groups, imported.head_dim)


def test_attention_is_counted_per_sequence():
    m = ModelConfig(**PRESETS["tiny"])
    one_long = attention_flops(m, [1024])
    assert attention_flops(m, [512, 512]) == pytest.approx(one_long / 2)  # two halves: half the quadratic work
    assert dense_flops_per_token(m, 1000) > 0
