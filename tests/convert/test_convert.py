"""HF safetensors import/export: logits equal transformers' for every architecture and RoPE scaling, export ->
original tensors bit for bit and loadable by transformers, sharded files both ways, the command line, one-line
errors naming the config.json key for what megalign cannot convert, and nothing lost: a conversion that fails midway
leaves the earlier output, an import never lands on a training run's checkpoints, and an export of a chat run stops
generating at its template's end-of-turn token.

The conversions run in one subprocess (hf_cases.py: torch.distributed starts once per process); the config
mapping and the checks that come before any model is built run here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megalign.config import load_config
from megalign.convert import hf_config as hfc
from megalign.errors import MegalignError
from tests.convert.hf_cases import CASES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{case: results} from one process running every case, and the directory holding each case's files."""
    work = tmp_path_factory.mktemp("convert")
    done = subprocess.run([sys.executable, str(HERE / "hf_cases.py"), str(work)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((work / "results.json").read_text()), work


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


# -- every architecture, through megalign and back ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_export_round_trips(converted, case):
    results, _ = converted
    r = results[case]
    assert "error" not in r, r.get("traceback")
    # megalign's forward on the imported checkpoint == transformers' forward on the original (fp32)
    assert r["logits_max_abs_diff"] < 1e-4, r["logits_max_abs_diff"]
    assert r["logits_max"] > 0.5  # not a model that outputs nothing
    # export: the same tensor names (less the ignored ones), every tensor bit-identical to the original
    assert r["names_only_in_original"] == r["ignored"] and r["names_only_in_export"] == []
    assert r["unequal_tensors"] == []
    # transformers loads the export with no missing/unexpected keys and computes the same logits
    assert r["loading_info"] == {}
    assert r["reloaded_logits_max_abs_diff"] == 0.0
    assert r["reloaded_config"]["model_type"] == hfc.ARCHITECTURES[r["architecture"]]


@pytest.mark.parametrize("case", list(CASES))
def test_training_loss_equals_transformers_with_a_padded_vocabulary(converted, case):
    """Vocabulary 200 padded to 256: the padded rows take no part in the loss (it equals transformers' per token)
    nor in its gradient (none reaches them; the real rows' gradient equals transformers')."""
    r = converted[0][case]
    assert "error" not in r, r.get("traceback")
    assert r["loss_max_abs_diff"] < 1e-5 * r["loss_mean"], r["loss_max_abs_diff"]
    assert r["head_grad_max_abs_diff"] < 1e-5 * r["head_grad_max"], r["head_grad_max_abs_diff"]
    assert r["padded_rows_grad_max"] == 0.0


def test_sharded_checkpoints_both_ways(converted):
    results, _ = converted
    imported = results["llama-gqa-sharded"]
    assert "model.safetensors.index.json" in imported["hf_files"] and len(imported["hf_files"]) > 3
    assert "model.safetensors.index.json" in imported["exported_files"]
    assert "model.safetensors.index.json" in results["qwen2-tied"]["exported_files"]  # sharded export only
    assert results["llama-mha"]["exported_files"] == ["config.json", "generation_config.json",
                                                      "model.safetensors"]


def test_tied_embeddings_export_without_lm_head(converted):
    results, work = converted
    for case in ("llama-tied", "qwen2-tied"):
        assert results[case]["reloaded_config"]["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(work / "llama-tied" / "exported" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_tensors_without_weights_of_their_own_are_ignored(converted):
    results, _ = converted
    assert results["llama-tied-extras"]["ignored"] == ["lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert results["llama-tied"]["ignored"] == []


def test_model_yaml_is_a_training_config(converted):
    _, work = converted
    for case in ("glm", "llama-rope-llama3"):
        cfg = load_config(str(work / case / "imported" / "model.yaml"))
        expected, _ = hfc.hf_to_model_config(hfc.read_hf_config(work / case / "hf"))
        assert cfg.model == expected
        assert (work / case / "imported" / "hf" / "config.json").is_file()
    assert "checkpoint.init_from=" in (work / "glm" / "imported" / "model.yaml").read_text()


def test_manifest_records_the_source(converted):
    _, work = converted
    manifest = json.loads((work / "qwen2" / "imported" / "step_0000000" / "megalign.json").read_text())
    assert manifest["kind"] == "weights"
    assert manifest["source"]["architecture"] == "Qwen2ForCausalLM"
    assert manifest["source"]["hf_config"]["model_type"] == "qwen2"
    assert manifest["model"]["padded_vocab_size"] == 256 and manifest["model"]["vocab_size"] == 200


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_import_then_export_with_tokenizer(converted, tmp_path, word_tokenizer_dir):
    _, work = converted
    hf = tmp_path / "hf"
    shutil.copytree(work / "glm" / "hf", hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(word_tokenizer_dir / name, hf / name)
    out, exported = tmp_path / "imported", tmp_path / "exported"
    done = run_tool("import", "--hf", hf, "--out", out, "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert "GlmForCausalLM" in done.stdout and f"checkpoint.init_from={out}" in done.stdout
    assert (out / "hf" / "tokenizer.json").is_file() and (out / "latest").is_file()
    done = run_tool("export", "--checkpoint", out, "--out", exported, "--tokenizer", out / "hf")
    assert done.returncode == 0, done.stderr
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GlmForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert config["partial_rotary_factor"] == 0.5
    assert (exported / "tokenizer.json").is_file() and (exported / "tokenizer_config.json").is_file()
    done = run_tool("export", "--checkpoint", out, "--out", exported)  # never overwritten by accident
    assert done.returncode == 2 and "--overwrite" in done.stderr


def test_cli_errors_are_one_line(tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    done = run_tool("import", "--hf", hf, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.startswith("error: config.json architectures=['GPT2LMHeadModel'] is not supported")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- what megalign refuses, before building anything ----------------------------------------------------------------
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=200, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("change,message", [
    (dict(architectures=["FalconForCausalLM"]), "config.json architectures=['FalconForCausalLM'] is not supported; "
     "megalign converts LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GlmForCausalLM"),
    (dict(model_type="mistral"), "config.json model_type='mistral' does not match architectures=['LlamaForCausalLM']"),
    (dict(hidden_act="gelu"), "config.json hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "config.json rope_scaling.rope_type='longrope' is "
     "not supported; megalign has default, linear, dynamic, yarn, llama3"),
    (dict(rope_parameters={"rope_type": "su"}), "config.json rope_parameters.rope_type='su' is not supported"),
    (dict(rope_parameters={"rope_type": "linear"}), "config.json rope_parameters.factor is missing"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                           "truncate": False}), "config.json rope_parameters.truncate=false"),
    (dict(attention_bias=True), "config.json attention_bias=true with mlp_bias=false"),
    (dict(partial_rotary_factor=0.5), "config.json partial_rotary_factor=0.5: LlamaForCausalLM rotates the whole"),
    (dict(num_key_value_heads=3), "config.json num_key_value_heads=3 does not divide num_attention_heads=4"),
    (dict(quantization_config={"quant_method": "gptq"}), "config.json quantization_config is set"),
    (dict(hidden_size=None), "config.json hidden_size is missing"),
    (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=128),
     "config.json sliding_window=128 is in use"),
])
def test_unsupported_configs_name_the_key(change, message):
    with pytest.raises(MegalignError) as e:
        hfc.hf_to_model_config({**LLAMA, **change})
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_sliding_window_is_refused_unless_the_context_fits_in_it():
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "max_position_embeddings": 32768, "sliding_window": 4096}
    with pytest.raises(MegalignError, match="sliding_window=4096 is in use .* import with max_position_embeddings 4096"):
        hfc.hf_to_model_config(mistral)
    cfg, _ = hfc.hf_to_model_config(mistral, max_position_embeddings=4096)
    assert cfg.max_position_embeddings == 4096
    # Mistral's default window applies when the key is absent; null means none
    assert hfc.hf_to_model_config({**mistral, "sliding_window": None})[0].max_position_embeddings == 32768
    qwen = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768,
            "sliding_window": 4096, "max_window_layers": 1}
    assert hfc.hf_to_model_config(qwen)[0].add_qkv_bias  # use_sliding_window false: the window is unused
    with pytest.raises(MegalignError, match="sliding_window=4096 is in use"):
        hfc.hf_to_model_config({**qwen, "use_sliding_window": True})


def test_config_mapping_details():
    # legacy rope keys (transformers 4.x) and the new rope_parameters give the same model
    legacy, _ = hfc.hf_to_model_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    new, _ = hfc.hf_to_model_config({**LLAMA, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert legacy == new and new.rope_scaling == "llama3" and new.rotary_base == 500000.0
    # GLM's defaults: partial, interleaved rotary; qkv bias; head_dim 128
    glm, _ = hfc.hf_to_model_config({**LLAMA, "architectures": ["GlmForCausalLM"], "model_type": "glm"})
    assert (glm.rotary_percent, glm.rotary_interleaved, glm.add_qkv_bias, glm.kv_channels) == (0.5, True, True, 128)
    # YaRN with DeepSeek's mscale pair: HF's attention factor
    yarn, _ = hfc.hf_to_model_config({**LLAMA, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "mscale": 1.0,
        "mscale_all_dim": 1.0}})
    assert yarn.rope_attention_factor == 1.0 and yarn.rope_original_max_position_embeddings == 512
    # dynamic NTK: HF's trained length is max_position_embeddings
    ntk, _ = hfc.hf_to_model_config({**LLAMA, "max_position_embeddings": 4096,
                                     "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    assert (ntk.rope_scaling, ntk.rope_original_max_position_embeddings) == ("ntk", 4096)


@pytest.mark.parametrize("arch,change,message", [
    ("Qwen2ForCausalLM", dict(add_qkv_bias=False), "Qwen2 has biases on q/k/v only"),
    ("LlamaForCausalLM", dict(add_qkv_bias=True), "biases on q/k/v only cannot be written as Llama/Mistral"),
    ("GlmForCausalLM", dict(), "GLM rotates interleaved pairs"),
    ("LlamaForCausalLM", dict(rotary_percent=0.5), "rotates the whole head in halves"),
])
def test_export_refuses_what_the_architecture_cannot_hold(arch, change, message):
    from megalign.config import ModelConfig

    cfg = ModelConfig(vocab_size=200, **change)
    with pytest.raises(MegalignError, match=message):
        hfc.model_config_to_hf(cfg, arch, "float32")


def test_export_keeps_token_ids_of_the_base_config():
    from megalign.config import ModelConfig

    base = {**LLAMA, "bos_token_id": 1, "eos_token_id": [2, 3], "sliding_window": 64, "custom": "kept"}
    config = hfc.model_config_to_hf(ModelConfig(vocab_size=200), "LlamaForCausalLM", "bfloat16", base)
    assert (config["bos_token_id"], config["eos_token_id"], config["custom"]) == (1, [2, 3], "kept")
    assert "sliding_window" not in config and config["dtype"] == "bfloat16"


def test_import_checks_tensors_before_building(converted, tmp_path):
    """Missing, left-over and misshapen tensors are one error each, before any process group starts."""
    import torch
    from safetensors.torch import load_file, save_file

    from megalign.convert import import_hf

    _, work = converted
    original = load_file(work / "llama-mha" / "hf" / "model.safetensors")

    def attempt(tensors):
        hf = tmp_path / "hf"
        shutil.rmtree(hf, ignore_errors=True)
        hf.mkdir()
        shutil.copy(work / "llama-mha" / "hf" / "config.json", hf)
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(MegalignError) as e:
            import_hf(hf, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return str(e.value)

    missing = {k: v for k, v in original.items() if k != "model.layers.1.mlp.up_proj.weight"}
    assert "1 tensor(s) that config.json implies for LlamaForCausalLM are missing: " \
           "model.layers.1.mlp.up_proj.weight" in attempt(missing)
    extra = {**original, "model.layers.2.mlp.up_proj.weight": torch.zeros(2)}
    assert "1 tensor(s) are not part of a LlamaForCausalLM with this config.json (left over, nothing would read " \
           "them): model.layers.2.mlp.up_proj.weight" in attempt(extra)
    bad = {**original, "model.norm.weight": torch.zeros(65)}
    assert "model.norm.weight has shape [65], config.json implies [64]" in attempt(bad)
    assert torch.distributed.is_initialized() is False


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory, word_tokenizer_dir):
    """HF Mistral (eos_token_id 2, the tokenizer's </s>) -> megalign -> a training run (checkpoint.init_from) on
    ChatML data, whose assistant turns end with <|im_end|> (id 8): (the run's checkpoint root, the data prefix)."""
    from megalign.data.preprocess import PreprocessOptions, preprocess

    _, work = converted
    tmp_path = tmp_path_factory.mktemp("trained")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hi hello"},
                                                      {"role": "assistant", "content": "bye ok be brief"}]}) + "\n"
                             for _ in range(8)))
    data = preprocess(PreprocessOptions(inputs=[str(chats)], tokenizer=str(word_tokenizer_dir), chat_template="chatml",
                                        seq_length=64, output_prefix=str(tmp_path / "ds"), progress=False)).prefix
    imported, run = work / "mistral" / "imported", tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "megalign.train", "--config", str(imported / "model.yaml"),
                           f"data.path={data}", f"checkpoint.init_from={imported}", f"run.output_dir={run}",
                           "training.steps=2", "training.global_batch=1", "run.progress=false"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return run / "checkpoints", data


def test_train_from_an_import_then_export_keeps_the_architecture(trained, tmp_path):
    """HF Mistral -> megalign -> a training run (checkpoint.init_from) -> HF: still a Mistral, loadable."""
    exported = tmp_path / "exported"
    done = run_tool("export", "--checkpoint", trained[0], "--out", exported)
    assert done.returncode == 0, done.stderr
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


# -- nothing lost: faults midway, outputs that are not ours, models that stop ---------------------------------------
def test_a_failed_overwrite_leaves_the_earlier_output(converted, tmp_path):
    """import/export with overwrite that fail midway (a fault injected after the new checkpoint is written, after
    the first safetensors tensor): the earlier output is byte for byte as it was, and loads; nothing is left beside
    it. Without a fault the new output replaces the old one."""
    _, work = converted
    done = subprocess.run([sys.executable, str(HERE / "fault_cases.py"), str(work / "llama-mha" / "hf"),
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert "error" not in r, r.get("traceback")
    assert r["import_error"] == "injected fault" and r["export_error"] == "injected fault"
    assert r["import_unchanged"] and r["import_loads"]
    assert r["export_unchanged"] and r["export_loads"] == {}
    assert r["leftovers_after_import_fault"] == r["leftovers_after_export_fault"] == []
    assert r["replaced"] and r["leftovers_after_replace"] == []


def test_a_replace_killed_between_its_renames_is_undone(tmp_path):
    """Killed after the old output was renamed aside and before the new one was renamed in: the next conversion
    to the same place puts the old one back (and refuses to replace it without overwrite)."""
    from megalign.convert import convert

    out = tmp_path / "exported"
    aside = tmp_path / f"{convert.ASIDE_PREFIX}exported"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    (tmp_path / f"{convert.SCRATCH_PREFIX}exported").mkdir()  # the new one, half written
    with pytest.raises(MegalignError, match="exists and is not empty"):
        convert._prepare_output(out, False, "export")
    assert (out / "config.json").read_text() == "{}" and not aside.exists()
    with convert._replacing(out) as scratch:
        assert list(scratch.iterdir()) == []  # the half-written one is gone
        (scratch / "config.json").write_text('{"new": 1}')
    assert (out / "config.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_import_refuses_a_training_runs_checkpoint_directory(converted, trained, tmp_path):
    """out is (or lies inside) a directory of training checkpoints: one line, nothing removed, even with
    overwrite; before any model is built."""
    import torch

    from megalign.convert import import_hf

    _, work = converted
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(trained[0], checkpoints)  # were it removed, the other tests of the run would fail too
    before = sorted(str(p) for p in checkpoints.rglob("*"))
    step = sorted(checkpoints.glob("step_*"))[-1]
    for out in (checkpoints, step, checkpoints / "new" / "import"):
        with pytest.raises(MegalignError) as e:
            import_hf(work / "llama-mha" / "hf", out, overwrite=True)
        assert "the checkpoint directory of a training run (nothing removed)" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    assert sorted(str(p) for p in checkpoints.rglob("*")) == before
    assert torch.distributed.is_initialized() is False
    done = run_tool("import", "--hf", work / "llama-mha" / "hf", "--out", checkpoints, "--overwrite")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: --out {checkpoints} is the checkpoint directory of a training run")
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(str(p) for p in checkpoints.rglob("*")) == before


def _generate(model, stop_at: int, steps: int = 8) -> list[int]:
    """Greedy generation with every token forced: word 15, then `stop_at` at the third step, then word 15 again."""
    import torch
    import transformers

    prompt = torch.tensor([[7, 22, 20, 8]])

    class Forced(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = torch.full_like(scores, -1e9)
            scores[:, stop_at if input_ids.shape[1] == prompt.shape[1] + 2 else 15] = 0
            return scores

    out = model.generate(prompt, max_new_tokens=steps, do_sample=False, logits_processor=[Forced()])
    return out[0, prompt.shape[1]:].tolist()


def test_export_of_a_chat_run_stops_at_its_end_of_turn_token(trained, tmp_path):
    """A run trained on ChatML ends its answers with <|im_end|> (8), not the tokenizer's eos </s> (2):
    generation_config.json keeps the original's eos and adds 8, so transformers' generate stops there."""
    import transformers

    exported = tmp_path / "exported"
    done = run_tool("export", "--checkpoint", trained[0], "--out", exported)
    assert done.returncode == 0, done.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert model.generation_config.eos_token_id == [2, 8]
    assert _generate(model, stop_at=8) == [15, 15, 8]
    assert model.generation_config.bos_token_id == 1  # the rest of the original's generation_config.json
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == 2  # the original's
    assert "generation: eos_token_id [2, 8]: [2] from the original + <|im_end|> (8), ending an assistant turn " \
           "in the chatml template the run was trained with" in done.stdout


def test_export_keeps_the_original_ids_when_the_template_is_unknown(trained, tmp_path):
    """The training data's PREFIX.json is gone: the template cannot be known, so the original's ids are kept and
    the summary says so."""
    import transformers

    checkpoints, data = trained
    meta = Path(data + ".json")
    hidden = meta.with_name(meta.name + ".hidden")
    meta.rename(hidden)
    try:
        exported = tmp_path / "exported"
        done = run_tool("export", "--checkpoint", checkpoints, "--out", exported)
    finally:
        hidden.rename(meta)
    assert done.returncode == 0, done.stderr
    assert f"generation: eos_token_id [2] from the original only: the chat template of the training run is " \
           f"unknown (the training data's {meta} cannot be read)" in done.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert model.generation_config.eos_token_id == 2


def test_export_of_an_import_keeps_its_generation_config(converted):
    """A weights checkpoint made by an import exports the original generation_config.json as it was."""
    results, _ = converted
    for case, r in results.items():
        assert r["generation_config"]["exported"] == r["generation_config"]["original"], case
