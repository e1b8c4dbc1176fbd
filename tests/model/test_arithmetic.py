"""Parameter counts of the presets against the published models, and against a built model."""

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


def test_attention_is_counted_per_sequence():
    m = ModelConfig(**PRESETS["tiny"])
    one_long = attention_flops(m, [1024])
    assert attention_flops(m, [512, 512]) == pytest.approx(one_long / 2)  # two halves: half the quadratic work
    assert dense_flops_per_token(m, 1000) > 0
