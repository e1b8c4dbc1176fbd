"""Chat templates: Conversation -> Sample(tokens, loss_mask).

The loss mask is 1 on exactly the assistant tokens and on the token that ends each assistant turn (the one the
model must learn to emit to stop); system and user tokens, role headers and separators are 0.

Built-in templates describe a conversation as Pieces (text, or a special token by name) and are tokenized piece
by piece, so every token belongs to one piece and its mask is exact. `hf` renders the tokenizer's own Jinja
`chat_template` and finds the assistant spans by rendering growing prefixes of the conversation.

How each built-in template relates to the published chat template of its model family (a model should be trained
on exactly the token sequences it sees at inference):

- `llama2`: Llama-2-chat's format; like the published template it strips each message's content (str.strip) and
  puts the system message inside the first [INST] block.
- `llama3`: Llama-3-instruct's format; like the published template it trims each message's content (str.strip,
  as Jinja's `trim`).
- `chatml`: plain ChatML, contents as given and no default system message (not Qwen2's published template, which
  adds one: use `qwen2` for Qwen2 models).
- `qwen2`: `chatml` plus Qwen2's default system message "You are a helpful assistant." when a conversation has
  none, as the published template does; loss mask and end-of-turn token (<|im_end|>) are chatml's.
- `chatglm3`: the ids of ChatGLM3's published tokenizer (build_single_message with empty metadata, then EOS as its
  fine-tuning code appends); its mask leaves out the "\n" after <|assistant|>, which that code also trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from megalign.data.records import Conversation, Message
from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError, OptionError


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n]; 1 where the token is a training target

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Piece:
    text: str | None = None
    special: str | None = None  # a special token, placed by id (never parsed from text)
    loss: bool = False
    constant: bool = False  # the template's own text (role names, separators): tokenized once, then cached


def _text(text: str, loss: bool = False) -> Piece:
    return Piece(text=text, loss=loss)


def _fixed(text: str) -> Piece:
    return Piece(text=text, constant=True)


def _special(token: str, loss: bool = False) -> Piece:
    return Piece(special=token, loss=loss)


def _split_system(conv: Conversation) -> tuple[str | None, tuple[Message, ...]]:
    if conv.messages[0].role == "system":
        return conv.messages[0].content, conv.messages[1:]
    return None, conv.messages


def llama2_pieces(conv: Conversation, bos: str, eos: str) -> list[Piece]:
    """Meta's Llama-2-chat format: <s>[INST] <<SYS>>\\n{s}\\n<</SYS>>\\n\\n{u} [/INST] {a} </s>, per turn.

    Every content is stripped of leading and trailing whitespace first, as the published template does.
    """
    system, turns = _split_system(conv)
    pieces = []
    for i in range(0, len(turns), 2):
        user, answer = turns[i].content.strip(), turns[i + 1].content.strip()
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
        pieces += [_special(bos), _text(f"[INST] {user} [/INST]"), _text(f" {answer} ", loss=True), _special(eos, loss=True)]
    return pieces


def llama3_pieces(conv: Conversation) -> list[Piece]:
    """<|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> per message.

    Every content is trimmed of leading and trailing whitespace first, as the published template does.
    """
    pieces = [_special("<|begin_of_text|>")]
    for m in conv.messages:
        answer = m.role == "assistant"
        pieces += [
            _special("<|start_header_id|>"),
            _fixed(m.role),
            _special("<|end_header_id|>"),
            _fixed("\n\n"),
            _text(m.content.strip(), loss=answer),
            _special("<|eot_id|>", loss=answer),
        ]
    return pieces


def chatml_pieces(conv: Conversation) -> list[Piece]:
    """Plain ChatML: <|im_start|>{role}\\n{content}<|im_end|>\\n per message, contents as given."""
    pieces = []
    for m in conv.messages:
        answer = m.role == "assistant"
        pieces += [
            _special("<|im_start|>"),
            _fixed(f"{m.role}\n"),
            _text(m.content, loss=answer),
            _special("<|im_end|>", loss=answer),
            _fixed("\n"),
        ]
    return pieces


QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."


def qwen2_pieces(conv: Conversation) -> list[Piece]:
    """Qwen2's format: ChatML, with the default system message first when the conversation has no system message."""
    pieces = chatml_pieces(conv)
    if conv.messages[0].role == "system":
        return pieces
    default = [_special("<|im_start|>"), _fixed("system\n"), _fixed(QWEN2_DEFAULT_SYSTEM), _special("<|im_end|>"),
               _fixed("\n")]
    return default + pieces


def chatglm3_pieces(conv: Conversation, eos: str) -> list[Piece]:
    """ChatGLM3: [gMASK]sop then <|{role}|>, "\\n", {content} per message, EOS at the end.

    These are the ids of the published ChatGLM3 tokenizer: its build_single_message(role, metadata="", content) is
    the role token, then the SentencePiece encoding of metadata + "\\n", then that of the content, each its own call
    (so each gets SentencePiece's dummy prefix "▁": ChatGLM3 encodes "\\n" as [30910 "▁", 13 "<0x0A>"]);
    its fine-tuning code (finetune_demo/finetune_hf.py) starts with [gMASK] sop and appends the EOS id. Every piece
    here is one tokenizer call too, so a SentencePiece .model gives the same ids (the special tokens must be pieces of
    that model: the published tokenizer.model lacks them and numbers them after its vocabulary, 64790 for [gMASK]).

    ChatGLM3 ends an answer by emitting the next role token (or EOS), so that token carries the loss. The published
    fine-tuning code also puts the loss on the metadata line ("\\n") after <|assistant|>; megalign does not (it is
    the turn's header, 0 as in every template here).
    """
    pieces = [_special("[gMASK]"), _special("sop")]
    previous_was_answer = False
    for m in conv.messages:
        answer = m.role == "assistant"
        pieces += [_special(f"<|{m.role}|>", loss=previous_was_answer), _fixed("\n"), _text(m.content, loss=answer)]
        previous_was_answer = answer
    pieces.append(_special(eos, loss=True))
    return pieces


class PieceEncoder:
    """Tokenizes the pieces of a built-in template; many conversations in one batched tokenizer call."""

    def __init__(self, tokenizer: Tokenizer, to_pieces: Callable[[Conversation], list[Piece]], probe: Conversation):
        self.tokenizer = tokenizer
        self.to_pieces = to_pieces
        # Resolve every special token once, up-front: a missing one is an error before any work.
        self.special_ids = {p.special: tokenizer.special_id(p.special) for p in to_pieces(probe) if p.special}
        self.constant_ids: dict[str, list[int]] = {}

    def _special_id(self, token: str) -> int:
        if token not in self.special_ids:
            self.special_ids[token] = self.tokenizer.special_id(token)
        return self.special_ids[token]

    def _constant_ids(self, text: str) -> list[int]:
        if text not in self.constant_ids:
            self.constant_ids[text] = self.tokenizer.encode_batch([text])[0]
        return self.constant_ids[text]

    def encode_many(self, conversations: list[Conversation]) -> list[Sample]:
        all_pieces = [self.to_pieces(c) for c in conversations]
        texts = [p.text for pieces in all_pieces for p in pieces if p.text is not None and not p.constant]
        encoded = iter(self.tokenizer.encode_batch(texts))
        samples = []
        for pieces in all_pieces:
            ids: list[int] = []
            lengths, losses = [], []
            for p in pieces:
                if p.special is not None:
                    part = [self._special_id(p.special)]
                elif p.constant:
                    part = self._constant_ids(p.text)
                else:
                    part = next(encoded)
                ids += part
                lengths.append(len(part))
                losses.append(p.loss)
            mask = np.repeat(np.asarray(losses, dtype=np.uint8), lengths)
            samples.append(Sample(np.fromiter(ids, dtype=np.int32, count=len(ids)), mask))
        return samples


class JinjaEncoder:
    """The tokenizer's own chat_template (Jinja, as transformers renders it), with exact assistant spans.

    The span of assistant turn i is the text between rendering messages[:i] with the generation prompt and
    rendering messages[:i+1], minus trailing whitespace (the end-of-turn token is inside it, the newline after
    it is not). Tokens starting inside a span carry the loss.
    """

    def __init__(self, tokenizer: Tokenizer, probe: Conversation):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not tokenizer.chat_template:
            raise OptionError(
                "chat_template", f"hf needs the tokenizer's chat_template (tokenizer_config.json or chat_template.jinja "
                f"beside tokenizer.json); {tokenizer.path} has none. Use a built-in template: {', '.join(TEMPLATE_NAMES)}"
            )

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(tokenizer.chat_template)
        except jinja2.exceptions.TemplateError as e:
            raise MegalignError(f"the chat_template of {tokenizer.path} does not parse: {e}") from None
        self.tokenizer = tokenizer
        self.variables = dict(tokenizer.special_tokens_map)
        self.encode_many([probe])  # a template that cannot render a plain conversation fails here, not mid-run

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.variables)

    def encode(self, conv: Conversation) -> Sample:
        messages = [{"role": m.role, "content": m.content} for m in conv.messages]
        full = self._render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise MegalignError(
                    "the tokenizer's chat_template does not render conversations prefix by prefix, so assistant "
                    f"spans cannot be found; use a built-in template: {', '.join(TEMPLATE_NAMES)}"
                )
            spans.append((len(before), len(through.rstrip())))
        ids, offsets = self.tokenizer.encode_with_offsets(full)
        mask = [int(any(start <= s < end for start, end in spans)) for s, _ in offsets]
        return Sample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8))

    def encode_many(self, conversations: list[Conversation]) -> list[Sample]:
        return [self.encode(c) for c in conversations]


TEMPLATE_NAMES = ("llama2", "llama3", "chatml", "chatglm3", "hf", "qwen2")

_PROBE = Conversation((Message("system", "s"), Message("user", "u"), Message("assistant", "a")))


def built_in_pieces(name: str, bos: str = "<s>", eos: str = "</s>"):
    """The pieces function of a built-in template (conversation -> pieces), with the tokenizer's BOS/EOS where
    the template writes them; None for `hf` and unknown names. make_encoder and the HF export both use it."""
    return {"llama2": lambda c: llama2_pieces(c, bos, eos), "llama3": llama3_pieces, "chatml": chatml_pieces,
            "qwen2": qwen2_pieces, "chatglm3": lambda c: chatglm3_pieces(c, eos)}.get(name)


def make_encoder(name: str, tokenizer: Tokenizer) -> PieceEncoder | JinjaEncoder:
    """The encoder for a template name; fails up-front on an unknown name or a missing special token."""
    pieces = built_in_pieces(name, tokenizer.bos_token or "<s>", tokenizer.eos_token or "</s>")
    if pieces is not None:
        probe = _PROBE
        if name == "chatglm3":  # its end of an answer is the next <|user|>: the probe needs one
            probe = Conversation(_PROBE.messages + (Message("user", "u"), Message("assistant", "a")))
        return PieceEncoder(tokenizer, pieces, probe)
    if name == "hf":
        return JinjaEncoder(tokenizer, _PROBE)
    raise MegalignError(f"unknown chat template {name!r}; valid: {', '.join(TEMPLATE_NAMES)}")
