"""Chat templates: golden token ids and loss masks, the mask property on real tokenizers, multi-turn."""

import string

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megalign.data.records import Conversation, Message
from megalign.data import templates
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
# TWO_TURNS has a system message, so qwen2 adds no default one: plain ChatML.
GOLDEN["qwen2"] = GOLDEN["chatml"]


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


END_OF_ANSWER = {"llama2": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>", "hf": "<|im_end|>",
                 "qwen2": "<|im_end|>"}

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
        # As the published templates: Llama 2 strips each content (and puts it between spaces), Llama 3 trims it.
        expected = {"llama2": f" {answer.strip()} ", "llama3": answer.strip()}.get(name, answer)
        assert body == expected


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
    with pytest.raises(MegalignError, match="valid: llama2, llama3, chatml, chatglm3, hf, qwen2"):
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


# Contents with whitespace at their edges (and inside): the published Llama 2 / Llama 3 templates strip / trim the
# edges of every content, inner whitespace stays; ChatML (chatml, qwen2) keeps contents as given.
SPACY = (Message("user", "\nhi "), Message("assistant", "  hello\n"),
         Message("user", "bye\n\n"), Message("assistant", " ok \n ok\n"))
SPACY_WITH_SYSTEM = Conversation((Message("system", " be brief\n"),) + SPACY)
SPACY_NO_SYSTEM = Conversation(SPACY)

SPACY_GOLDEN = {
    ("llama2", True): r"""
        <s> [INST] _ <<SYS>> \n be _ brief \n <</SYS>> \n \n hi _ [/INST] *_ *hello *_ *</s>
        <s> [INST] _ bye _ [/INST] *_ *ok *_ *\n *_ *ok *_ *</s>""",
    ("llama2", False): r"""
        <s> [INST] _ hi _ [/INST] *_ *hello *_ *</s>
        <s> [INST] _ bye _ [/INST] *_ *ok *_ *\n *_ *ok *_ *</s>""",
    ("llama3", True): r"""
        <|begin_of_text|>
        <|start_header_id|> system <|end_header_id|> \n \n be _ brief <|eot_id|>
        <|start_header_id|> user <|end_header_id|> \n \n hi <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> \n \n *hello *<|eot_id|>
        <|start_header_id|> user <|end_header_id|> \n \n bye <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> \n \n *ok *_ *\n *_ *ok *<|eot_id|>""",
    ("llama3", False): r"""
        <|begin_of_text|>
        <|start_header_id|> user <|end_header_id|> \n \n hi <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> \n \n *hello *<|eot_id|>
        <|start_header_id|> user <|end_header_id|> \n \n bye <|eot_id|>
        <|start_header_id|> assistant <|end_header_id|> \n \n *ok *_ *\n *_ *ok *<|eot_id|>""",
    # chatml is unchanged: contents as given, edges included, no default system message.
    ("chatml", True): r"""
        <|im_start|> system \n _ be _ brief \n <|im_end|> \n
        <|im_start|> user \n \n hi _ <|im_end|> \n
        <|im_start|> assistant \n *_ *_ *hello *\n *<|im_end|> \n
        <|im_start|> user \n bye \n \n <|im_end|> \n
        <|im_start|> assistant \n *_ *ok *_ *\n *_ *ok *\n *<|im_end|> \n""",
    ("chatml", False): r"""
        <|im_start|> user \n \n hi _ <|im_end|> \n
        <|im_start|> assistant \n *_ *_ *hello *\n *<|im_end|> \n
        <|im_start|> user \n bye \n \n <|im_end|> \n
        <|im_start|> assistant \n *_ *ok *_ *\n *_ *ok *\n *<|im_end|> \n""",
}
# With a system message of its own, qwen2 is exactly chatml (its no-system case is below: the word vocabulary
# cannot spell the default system message).
SPACY_GOLDEN["qwen2", True] = SPACY_GOLDEN["chatml", True]


@pytest.mark.parametrize("name,with_system", sorted(SPACY_GOLDEN))
def test_edge_whitespace_golden_ids_and_mask(word_tokenizer_dir, name, with_system):
    encoder = make_encoder(name, load_tokenizer(word_tokenizer_dir))
    [sample] = encoder.encode_many([SPACY_WITH_SYSTEM if with_system else SPACY_NO_SYSTEM])
    ids, mask = golden(SPACY_GOLDEN[name, with_system])
    assert sample.tokens.tolist() == ids
    assert sample.loss_mask.tolist() == mask


def test_llama_golden_of_spacy_contents_equals_that_of_clean_ones(word_tokenizer_dir):
    """Stripping the edges is all that changes: TWO_TURNS with edge whitespace (bar the inner one) renders as it."""
    padded = Conversation(tuple(Message(m.role, f" \n{m.content}\n ") for m in TWO_TURNS.messages))
    for name in ("llama2", "llama3"):
        encoder = make_encoder(name, load_tokenizer(word_tokenizer_dir))
        [a, b] = encoder.encode_many([padded, TWO_TURNS])
        assert a.tokens.tolist() == b.tokens.tolist() == golden(GOLDEN[name])[0]
        assert a.loss_mask.tolist() == b.loss_mask.tolist() == golden(GOLDEN[name])[1]


SPACY_TEXT = (Message("user", "\nhi there "), Message("assistant", "  hello.\n"),
              Message("user", "bye\n\n"), Message("assistant", " ok, bye \n"))
SPACY_TEXT_GOLDEN = {
    ("llama2", True): (
        "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi there [/INST] hello. </s>"
        "<s>[INST] bye [/INST] ok, bye </s>"),
    ("llama2", False): "<s>[INST] hi there [/INST] hello. </s><s>[INST] bye [/INST] ok, bye </s>",
    ("llama3", True): (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nok, bye<|eot_id|>"),
    ("llama3", False): (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nok, bye<|eot_id|>"),
    ("qwen2", True): (
        "<|im_start|>system\n be brief\n<|im_end|>\n<|im_start|>user\n\nhi there <|im_end|>\n"
        "<|im_start|>assistant\n  hello.\n<|im_end|>\n<|im_start|>user\nbye\n\n<|im_end|>\n"
        "<|im_start|>assistant\n ok, bye \n<|im_end|>\n"),
    ("qwen2", False): (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nhi there <|im_end|>\n"
        "<|im_start|>assistant\n  hello.\n<|im_end|>\n<|im_start|>user\nbye\n\n<|im_end|>\n"
        "<|im_start|>assistant\n ok, bye \n<|im_end|>\n"),
    ("chatml", False): (
        "<|im_start|>user\n\nhi there <|im_end|>\n"
        "<|im_start|>assistant\n  hello.\n<|im_end|>\n<|im_start|>user\nbye\n\n<|im_end|>\n"
        "<|im_start|>assistant\n ok, bye \n<|im_end|>\n"),
}
SPACY_TEXT_ANSWERS = {  # what each loss run decodes to: the answer as rendered, then the end-of-turn token
    "llama2": [" hello. </s>", " ok, bye </s>"],
    "llama3": ["hello.<|eot_id|>", "ok, bye<|eot_id|>"],
    "qwen2": ["  hello.\n<|im_end|>", " ok, bye \n<|im_end|>"],
    "chatml": ["  hello.\n<|im_end|>", " ok, bye \n<|im_end|>"],
}


@pytest.mark.parametrize("name,with_system", sorted(SPACY_TEXT_GOLDEN))
def test_rendered_text_is_the_published_templates(bpe_tokenizer_dir, name, with_system):
    """On a byte-level BPE (exact decoding): the whole sample decodes to the hand-written rendering, and the loss
    runs to exactly the rendered answers with their end-of-turn tokens."""
    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    messages = ((Message("system", " be brief\n"),) if with_system else ()) + SPACY_TEXT
    [sample] = make_encoder(name, tokenizer).encode_many([Conversation(messages)])
    assert tokenizer.decode(sample.tokens.tolist()) == SPACY_TEXT_GOLDEN[name, with_system]
    runs = _loss_runs(sample)
    assert [tokenizer.decode(r) for r in runs] == SPACY_TEXT_ANSWERS[name]
    end = tokenizer.special_id(END_OF_ANSWER[name])
    assert [r[-1] for r in runs] == [end, end]
    assert int(sample.loss_mask.sum()) == sum(len(r) for r in runs)


def test_qwen2_is_chatml_with_the_default_system_message(bpe_tokenizer_dir):
    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    qwen2, chatml = make_encoder("qwen2", tokenizer), make_encoder("chatml", tokenizer)
    no_system = Conversation(SPACY_TEXT)
    default = Conversation((Message("system", "You are a helpful assistant."),) + SPACY_TEXT)
    own = Conversation((Message("system", " be brief\n"),) + SPACY_TEXT)
    [q_none, q_own] = qwen2.encode_many([no_system, own])
    [c_default, c_none, c_own] = chatml.encode_many([default, no_system, own])
    # No system message: ids and mask are chatml's with the default system message first.
    assert q_none.tokens.tolist() == c_default.tokens.tolist()
    assert q_none.loss_mask.tolist() == c_default.loss_mask.tolist()
    assert len(q_none) > len(c_none)  # chatml itself adds none
    # A system message of its own: exactly chatml.
    assert q_own.tokens.tolist() == c_own.tokens.tolist() and q_own.loss_mask.tolist() == c_own.loss_mask.tolist()


@pytest.mark.parametrize("with_system", [True, False])
def test_qwen2_end_of_turn_and_loss_pieces_are_chatmls(with_system):
    """Code that finds a template's end-of-turn token from its loss-carrying special pieces finds <|im_end|>."""
    conv = SPACY_WITH_SYSTEM if with_system else SPACY_NO_SYSTEM

    def loss_pieces(pieces):
        return [(p.special, p.text) for p in pieces if p.loss]

    assert loss_pieces(templates.qwen2_pieces(conv)) == loss_pieces(templates.chatml_pieces(conv))
    assert {p.special for p in templates.qwen2_pieces(conv) if p.loss and p.special} == {"<|im_end|>"}
