"""Prompts as the model saw its training data: an item's user turn rendered with the chat template, ending at the
assistant's header (the tokens the model continues from), and the tokens that end an assistant turn (where
generation stops).

The render is the training render (megalign/data/templates.py) of the conversation [user: prompt, assistant: ""]
cut before its first loss token: whatever a template puts between the user turn and the answer is kept, and
nothing of the answer's end is. Items with `chat=False` (LongBench's few-shot and code tasks) are the plain text
after the tokenizer's BOS, as the official scripts encode them.
"""

from __future__ import annotations

from megalign.data.records import Conversation, Message
from megalign.data.templates import make_encoder
from megalign.data.tokenizer import Tokenizer
from megalign.eval.items import EvalItem


class PromptRenderer:
    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.encoder = make_encoder(template, tokenizer)
        probe = self.encoder.encode_many([Conversation((Message("user", "q"), Message("assistant", "a")))])[0]
        masked = probe.tokens[probe.loss_mask.astype(bool)]
        # the last loss token of an answer is the one that ends the turn (</s>, <|im_end|>, <|eot_id|>, ...)
        ends = [int(masked[-1])] if len(masked) else []
        if tokenizer.eos_token:
            ends.append(tokenizer.special_id(tokenizer.eos_token))
        self.stop_ids = list(dict.fromkeys(ends))

    def stop_ids_for(self, item: EvalItem) -> list[int]:
        """The end-of-turn ids, and for each of the item's stop strings the last id of its encoding (as LongBench's
        pred.py takes the "\\n" token)."""
        extra = [self.tokenizer.encode_batch([s])[0][-1] for s in item.stop_strings]
        return list(dict.fromkeys(self.stop_ids + extra))

    def prompt_ids(self, item: EvalItem) -> list[int]:
        if not item.chat:
            bos = [self.tokenizer.special_id(self.tokenizer.bos_token)] if self.tokenizer.bos_token else []
            return bos + self.tokenizer.encode_batch([item.prompt])[0]
        sample = self.encoder.encode_many([Conversation((Message("user", item.prompt), Message("assistant", "")))])[0]
        first_answer_token = int(sample.loss_mask.argmax()) if sample.loss_mask.any() else len(sample.tokens)
        return [int(t) for t in sample.tokens[:first_answer_token]]
