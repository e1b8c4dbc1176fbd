"""The model megalign trains: megatron's GPTModel with HF-exact RoPE at explicit positions (rope.py), whose padded
vocabulary never takes part in the loss.

The output layer has model.padded_vocab_size rows (a multiple of make_vocab_size_divisible_by, so that it splits
over any TP size); rows past the tokenizer's vocabulary are padding (zeros after an HF import). Left in the
softmax they would add exp(0) terms to its denominator and train the model toward tokens that do not exist, so the
loss sees them at -inf: the same loss and gradients as the unpadded model (transformers'), at every TP size.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import Tensor

from megalign.model.rope import GPTModelWithPositions


class MegalignGPTModel(GPTModelWithPositions):
    def __init__(self, config, *args, tokenizer_vocab_size: int, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.tokenizer_vocab_size = tokenizer_vocab_size

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """megatron's cross-entropy over this TP rank's slice of the vocabulary, padding masked out."""
        return super().compute_language_model_loss(labels, self.mask_padded_vocabulary(logits))

    def mask_padded_vocabulary(self, logits: Tensor) -> Tensor:
        """logits [..., local vocab] of this TP rank with the padded columns at -inf (no gradient reaches them)."""
        local = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * local  # this rank's first vocabulary id
        real = self.tokenizer_vocab_size - first
        if real >= local:
            return logits
        padded = torch.arange(local, device=logits.device) >= max(real, 0)
        return logits.masked_fill(padded, float("-inf"))
