"""chatglm3 against the token ids of ChatGLM3's published tokenizer, rebuilt by hand with the sentencepiece library.

The published tokenizer builds a message as the role's special token, then sp.encode(metadata + "\\n"), then
sp.encode(content): separate calls, so SentencePiece's dummy prefix "▁" starts each of them. Its fine-tuning code
puts [gMASK] sop first and the EOS id last.
"""

import random

import pytest

from megalign.data import synthetic
from megalign.data.records import Conversation, Message
from megalign.data.templates import make_encoder
from megalign.data.tokenizer import load_tokenizer

from ..conftest import SPECIALS

MESSAGES = (
    Message("user", "hi there"), Message("assistant", "hello.\nok"),
    Message("user", " bye\n"), Message("assistant", "ok, bye"),
)
SYSTEM = Message("system", "be brief")


@pytest.fixture(scope="module")
def chatglm3_like_model(tmp_path_factory):
    """A SentencePiece .model set up as ChatGLM3's is: no normalization, whitespace kept, byte fallback, so that
    "\\n" encodes as ["▁", "<0x0A>"] (ChatGLM3: [30910, 13]) and not to nothing as with the default normalizer."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm_chatglm3")
    rng = random.Random(0)
    sentences = [synthetic.filler(rng, 40) for _ in range(300)]
    specials = [s for s in SPECIALS if s not in ("<unk>", "<s>", "</s>")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(out / "sp"), vocab_size=400, user_defined_symbols=specials,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return out / "sp.model"


def published(sp, conv: Conversation) -> tuple[list[int], list[int], list[int]]:
    """The published ids, megalign's mask for them (1 on each answer and the token after it: the next role token or
    EOS) and the published fine-tuning code's labels mask (each whole message from the assistant role token on, shifted
    one to the right)."""
    ids, mask, official = [sp.piece_to_id("[gMASK]"), sp.piece_to_id("sop")], [0, 0], [0, 0]
    previous_was_answer = False
    for m in conv.messages:
        answer = m.role == "assistant"
        header, content = sp.encode("\n"), sp.encode(m.content)  # build_single_message(role, "", content)
        ids += [sp.piece_to_id(f"<|{m.role}|>")] + header + content
        mask += [int(previous_was_answer)] + [0] * len(header) + [int(answer)] * len(content)
        official += [int(answer)] * (1 + len(header) + len(content))
        previous_was_answer = answer
    ids.append(sp.eos_id())
    mask.append(1)
    official = [0] + official  # loss_masks = [False, *loss_masks]: shifted one right, so the EOS gets one too
    return ids, mask, official


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("model", ["sentencepiece_model", "chatglm3_like_model"])
def test_chatglm3_ids_are_the_published_tokenizers(request, model, with_system):
    import sentencepiece as spm

    path = request.getfixturevalue(model)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    conv = Conversation(((SYSTEM,) if with_system else ()) + MESSAGES)
    [sample] = make_encoder("chatglm3", load_tokenizer(path)).encode_many([conv])
    ids, mask, official = published(sp, conv)
    assert len(official) == len(ids)
    assert sample.tokens.tolist() == ids
    assert sample.loss_mask.tolist() == mask
    # The one difference from the published fine-tuning labels: the "\n" header after each <|assistant|>.
    assistant = sp.piece_to_id("<|assistant|>")
    header = len(sp.encode("\n"))
    after_assistant = {i + 1 + k for i, t in enumerate(ids) if t == assistant for k in range(header)}
    assert {i for i, (a, b) in enumerate(zip(mask, official)) if a != b} == after_assistant
    assert all(official[i] == 1 and mask[i] == 0 for i in after_assistant)
    if model == "chatglm3_like_model":  # the dummy prefix is really there, once per call, as in ChatGLM3
        assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]
        assert ids[3:5] == sp.encode("\n") and sp.id_to_piece(ids[5]).startswith("▁")
        assert len(after_assistant) == 4


def test_chatglm3_ids_differ_from_one_encoding_of_the_rendered_text(chatglm3_like_model):
    """Why the parts must be encoded apart: encoding "<|user|>\\n{content}" as one text gives other ids (one dummy
    prefix, at the start, and none before the content)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(chatglm3_like_model))
    conv = Conversation(MESSAGES)
    [sample] = make_encoder("chatglm3", load_tokenizer(chatglm3_like_model)).encode_many([conv])
    whole = "".join(f"<|{m.role}|>\n{m.content}" for m in conv.messages)
    one_call = [sp.piece_to_id("[gMASK]"), sp.piece_to_id("sop")] + sp.encode(whole) + [sp.eos_id()]
    assert sample.tokens.tolist() == published(sp, conv)[0] != one_call
