"""Hugging Face safetensors import and export (Llama 2/3, Mistral, Qwen2, GLM-4): see convert.py."""

from megalign.convert.convert import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
