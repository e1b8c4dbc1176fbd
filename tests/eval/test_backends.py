"""The hf backend on a megalign checkpoint: imported, exported on the fly by the evaluation, then generating with
transformers until the chat template's end-of-turn token (or LongBench samsum's newline, never as the first token).

The model is a tiny Llama whose next token is chosen by hand: every layer's output projections are zero, so the
last hidden state is the current token's embedding, and lm_head maps each embedding to the next token we want.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megalign.data.tokenizer import load_tokenizer
from megalign.eval.items import EvalItem
from megalign.eval.prompting import PromptRenderer

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 64


def chain_model(out: Path, tokenizer_dir: Path, next_token: dict[int, int], otherwise: int,
                second_choice: dict[int, int] | None = None) -> Path:
    """A HF Llama dir that, after token t, generates next_token[t] (and `otherwise` after any other token);
    second_choice[t] is what it generates after t when next_token[t] is not allowed."""
    import torch
    import transformers

    assert len(next_token) < HIDDEN
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # nothing is added to the residual stream: it stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
        embedding.zero_()
        embedding[:, 0] = 1.0  # every token not in the chain: basis vector 0
        head.zero_()
        head[otherwise, 0] = 10.0
        for k, (token, following) in enumerate(next_token.items(), start=1):
            embedding[token].zero_()
            embedding[token, k] = 1.0
            head[following, k] = 10.0
            if token in (second_choice or {}):
                head[second_choice[token], k] = 5.0
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_batch([text])[0]


def test_an_exported_megalign_checkpoint_stops_at_the_end_of_turn_token(bpe_tokenizer_dir, tmp_path):
    from megalign.convert import import_hf
    from megalign.eval.backends import HFBackend
    from megalign.eval.models import hf_model

    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    renderer = PromptRenderer(tokenizer, "chatml")
    im_end = tokenizer.special_id("<|im_end|>")
    assert renderer.stop_ids[0] == im_end
    item = EvalItem(task="t", id="0", prompt="What is the pass key?", references=[], max_new_tokens=40)
    header_end = renderer.prompt_ids(item)[-1]
    answer = _ids(tokenizer, " seven")
    assert header_end not in answer and im_end not in answer
    chain = dict(zip([header_end, *answer[:-1]], answer))
    chain[answer[-1]] = im_end  # the answer, then the end of the turn; after it: the end of the turn forever
    hf = chain_model(tmp_path / "hf", bpe_tokenizer_dir, chain, otherwise=im_end)
    import_hf(hf, tmp_path / "megalign")

    source = hf_model(str(tmp_path / "megalign"), tmp_path / "eval", tokenizer=None)
    assert source.hf_dir == tmp_path / "eval" / "model-hf" and source.tokenizer == str(tmp_path / "megalign" / "hf")
    assert (source.hf_dir / "tokenizer.json").is_file()  # the import's tokenizer went with the export
    generation = HFBackend(source.hf_dir, renderer, device="cpu").generate(item)
    assert generation.text == " seven"
    assert generation.new_tokens == len(answer)  # stopped at <|im_end|>, not after 40 tokens

    without_stop = PromptRenderer(tokenizer, "chatml")
    without_stop.stop_ids = []  # the same model runs on to max_new_tokens when nothing stops it
    assert HFBackend(source.hf_dir, without_stop, device="cpu").generate(item).new_tokens == 40


def test_samsums_newline_stops_generation_but_not_as_the_first_token(bpe_tokenizer_dir, tmp_path):
    from megalign.eval.backends import HFBackend

    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    renderer = PromptRenderer(tokenizer, "chatml")
    newline = _ids(tokenizer, "\n")[-1]
    item = EvalItem(task="longbench/samsum", id="0", prompt="Dialogue: hi\nSummary:", references=[],
                    max_new_tokens=20, chat=False, stop_strings=("\n",))
    assert renderer.stop_ids_for(item) == [*renderer.stop_ids, newline]
    last = renderer.prompt_ids(item)[-1]
    word = _ids(tokenizer, " hello")
    assert newline not in (last, *word)
    # the model would answer "\n" at once; as pred.py's min_length, the first token may not be a stop token, so
    # it writes its second choice, " hello", and then stops at the "\n" after it
    chain = {last: newline, **dict(zip(word, [*word[1:], newline]))}
    hf = chain_model(tmp_path / "hf", bpe_tokenizer_dir, chain, otherwise=newline, second_choice={last: word[0]})
    generation = HFBackend(hf, renderer, device="cpu").generate(item)
    assert generation.text == " hello" and generation.new_tokens == len(word)
    plain = EvalItem(task="longbench/trec", id="0", prompt=item.prompt, references=[], max_new_tokens=20, chat=False)
    assert HFBackend(hf, renderer, device="cpu").generate(plain).new_tokens == 20  # no stop string: "\n" goes on


def test_every_checkpoint_of_a_run_is_evaluated_and_compared(bpe_tokenizer_dir, tmp_path):
    """--all-checkpoints on a root with two checkpoints: OUT/step_N each, checkpoints.md with both and the change;
    --compare prints the same table from the finished runs."""
    from megalign.convert import import_hf

    tokenizer = load_tokenizer(bpe_tokenizer_dir)
    im_end = tokenizer.special_id("<|im_end|>")
    root = tmp_path / "run" / "checkpoints"
    for step, seed_token in ((0, " one"), (5, " two")):
        hf = chain_model(tmp_path / f"hf{step}", bpe_tokenizer_dir, {}, otherwise=_ids(tokenizer, seed_token)[0])
        import_hf(hf, tmp_path / f"imported{step}")
        shutil.move(tmp_path / f"imported{step}" / "step_0000000", root / f"step_{step:07d}")
        manifest = root / f"step_{step:07d}" / "megalign.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "step": step}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "megalign.eval", "--model", str(root), "--all-checkpoints",
                           "--tokenizer", str(bpe_tokenizer_dir), "--chat-template", "chatml", "--tasks", "needle",
                           "--max-length", "400", "--needle-lengths", "1", "--needle-depths", "2", "--out", str(out),
                           "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for step in ("step_0000000", "step_0000005"):
        records = [json.loads(line) for line in (out / step / "items.jsonl").read_text().splitlines()]
        assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    table = (out / "checkpoints.md").read_text()
    assert table.splitlines()[0] == "| score | step_0000000 | step_0000005 | step_0000005 - step_0000000 |"
    assert table.splitlines()[2].startswith("| needle | 0 | 0 | +0.00 |")
    assert im_end not in (_ids(tokenizer, " one")[0], _ids(tokenizer, " two")[0])

    compared = subprocess.run([sys.executable, "-m", "megalign.eval", "--compare", str(out / "step_0000000"),
                               str(out / "step_0000005")], capture_output=True, text=True, env=env, timeout=120)
    assert compared.returncode == 0 and compared.stdout == table
    missing = subprocess.run([sys.executable, "-m", "megalign.eval", "--compare", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "is not a finished evaluation" in missing.stderr


@pytest.mark.parametrize("results,rows", [
    ({"tasks": {"needle": {"score": 50.0, "items": 4}}}, {"needle": 50.0}),
    ({"tasks": {"longbench/trec": {"score": 60.0}, "longbench averages": {
        "longbench": {"tasks": {"trec": 60.0}, "categories": {"Few-shot Learning": 60.0}, "overall": 60.0}}}},
     {"longbench/trec": 60.0, "longbench categories Few-shot Learning": 60.0, "longbench overall": 60.0}),
])
def test_every_score_of_a_run_is_a_row(results, rows):
    from megalign.eval.compare import flat_scores

    assert flat_scores(results) == rows
