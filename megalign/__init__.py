"""megalign: long-context alignment of LLMs on megatron-core."""

__version__ = "0.1.0"
