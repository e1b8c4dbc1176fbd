"""Build a real Hugging Face tokenizer (byte-level BPE, tokenizer.json + tokenizer_config.json) offline.

For the built-in example, the tests and the benchmarks. It carries the special tokens of every built-in chat
template and a ChatML `chat_template`, so all templates (and `hf`) work with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

TEMPLATE_SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>",  # llama2 (and bos/eos)
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama3
    "<|im_start|>", "<|im_end|>",  # chatml
    "[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",  # chatglm3
]

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000,
                        chat_template: str | None = CHATML_JINJA) -> Path:
    """Train a byte-level BPE on `texts`; writes OUT/tokenizer.json and OUT/tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TEMPLATE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 1 << 20}
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return out
