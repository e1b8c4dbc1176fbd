"""megatron-core GPTModel from a ModelConfig: layer spec with a THD core attention, presets, initialisation."""
