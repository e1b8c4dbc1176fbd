"""Chat templates: golden token ids and loss masks, the mask property on real tokenizers, multi-turn."""

import string

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megalign.data.records import Conversation, Message
from megalign.data.templates import TEMPLATE_NAMES, make_encoder
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError

from ..conftest import SPECIALS, WORDS

VOCAB = SPECIALS + WORDS
TWO_TURNS = Conversation((
    Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello"),
    Message("user", "bye"), Message("assistant", "ok"),
))


def golden(spec: str) -> tuple[list[int], list[int]]:
    """'a *b' -> ids of [a, b] and mask [0, 1]; '_' is a space token, '\\n' a newline token."""
    ids, mask = [], []
    for item in spec.split():
        loss = item.startswith("*") and len(item) > 1
        token = item[1:] if loss else item
        token = {"_": " ", "\\n": "\n"}.get(token, token)
        ids.append(VOCAB.index(token))
        mask.append(int(loss))
    return ids, mask


GOLDEN = {
    "chatml": r"""
        <|im_start|> system \n be _ brief <|im_end|> \n
        <|im_start|> user \n hi <|im_end|> \n
        <|im_start|> assistant \n *hello *<|im_end|> \n
        <|im_start|> user \n bye <|im_end|> \n
        <|im_start|> assistant \n *ok *<|im_end|> \n""",
    "llama2": r"""
        <s> [INST] _ <<SYS>> \n be _ brief \n <</SYS>> \n \n hi _ [/INST] *_ *hello *_ *</s>
        <s> [INST] _ bye _ [/INST] *_ *ok *_ *</s>""",
    "llama3": r"""
        <|begin_of_text|>
        <|start_header_id|> system <|end_header_id|> \n \n be _ brief <|eot_id|>
        <|start_header_id|> user <|end_header_id|> \n \n hi <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> \n \n *hello *<|eot_id|>
        <|start_header_id|> user <|end_header_id|> \n \n bye <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> \n \n *ok *<|eot_id|>""",
    "chatglm3": r"""
        [gMASK] sop <|system|> \n be _ brief <|user|> \n hi <|assistant|> \n *hello
        *<|user|> \n bye <|assistant|> \n *ok *</s>""",
}
# The tokenizer's own chat_template is ChatML here: rendered and tokenized whole, it must give the same.
GOLDEN["hf"] = GOLDEN["chatml"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_golden_ids_and_mask(word_tokenizer_dir, name):
    encoder = make_encoder(name, load_tokenizer(word_tokenizer_dir))
    [sample] = encoder.encode_many([TWO_TURNS])
    ids, mask = golden(GOLDEN[name])
    assert sample.tokens.tolist() == ids
    assert sample.loss_mask.tolist() == mask
    assert sample.tokens.dtype == np.int32 and sample.loss_mask.dtype == np.uint8


def _loss_runs(sample) -> list[list[int]]:
    runs, current = [], []
    for token, m in zip(sample.tokens.tolist(), sample.loss_mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


END_OF_ANSWER = {"llama2": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>", "hf": "<|im_end|>"}

text = st.text(alphabet=string.ascii_letters + string.digits + " .,:;!?'\n\t-éü中文😀", min_size=1, max_size=40).filter(
    lambda s: s.strip())


@st.composite
def conversations(draw):
    messages = [Message("system", draw(text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [Message("user", draw(text)), Message("assistant", draw(text))]
    return Conversation(tuple(messages))


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@given(conv=conversations())
def test_mask_covers_exactly_the_answers_and_their_end_tokens(bpe_tokenizer_dir, name, conv):
    """On a byte-level BPE (exact decoding): one loss run per answer, decoding to the answer + its end token."""
    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    [sample] = make_encoder(name, tokenizer).encode_many([conv])
    answers = [m.content for m in conv.messages if m.role == "assistant"]
    runs = _loss_runs(sample)
    assert len(runs) == len(answers)
    for i, (run, answer) in enumerate(zip(runs, answers)):
        decoded = tokenizer.decode(run)
        if name == "chatglm3":  # an answer ends with the next role token, the last one with EOS
            end = "<|user|>" if i < len(answers) - 1 else "</s>"
        else:
            end = END_OF_ANSWER[name]
        assert decoded.endswith(end)
        body = decoded[: -len(end)]
        assert body.strip() == answer.strip() if name == "llama2" else body == answer


def test_sentencepiece_model_with_llama2_and_chatml(sentencepiece_model):
    tokenizer = load_tokenizer(sentencepiece_model)
    assert tokenizer.kind == "sentencepiece"
    for name in ("llama2", "chatml"):
        [sample] = make_encoder(name, tokenizer).encode_many([TWO_TURNS])
        runs = _loss_runs(sample)
        assert len(runs) == 2
        end = "</s>" if name == "llama2" else "<|im_end|>"
        assert runs[0][-1] == tokenizer.special_id(end)
        assert [tokenizer.decode(r[:-1]).strip() for r in runs] == ["hello", "ok"]
        assert sample.tokens[0] == tokenizer.special_id("<s>" if name == "llama2" else "<|im_start|>")


def test_batched_encoding_equals_one_by_one(bpe_tokenizer_dir):
    encoder = make_encoder("llama3", load_tokenizer(bpe_tokenizer_dir))
    convs = [TWO_TURNS, Conversation((Message("user", "q"), Message("assistant", "a b c")))]
    together = encoder.encode_many(convs)
    alone = [encoder.encode_many([c])[0] for c in convs]
    for a, b in zip(together, alone):
        assert a.tokens.tolist() == b.tokens.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


def test_unknown_template_lists_the_valid_ones(word_tokenizer_dir):
    with pytest.raises(MegalignError, match="valid: llama2, llama3, chatml, chatglm3, hf"):
        make_encoder("vicuna", load_tokenizer(word_tokenizer_dir))


def test_missing_special_token_fails_up_front(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MegalignError, match="has no token '<\\|im_start\\|>'"):
        make_encoder("chatml", load_tokenizer(tmp_path / "tokenizer.json"))


def test_hf_template_needs_a_chat_template(sentencepiece_model):
    with pytest.raises(MegalignError, match="needs the tokenizer's chat_template"):
        make_encoder("hf", load_tokenizer(sentencepiece_model))
