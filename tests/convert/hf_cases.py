"""Run by tests/convert/test_convert.py in a process of its own (torch.distributed starts once per process):

  python tests/convert/hf_cases.py WORKDIR [CASE ...]

For every case: a tiny random transformers model (fp32, every weight random, norms and biases too) saved as
safetensors -> import -> a fresh megalign model loads the checkpoint -> logits against transformers' -> export ->
the exported tensors against the original ones -> transformers loads the export -> logits again.
Writes WORKDIR/results.json ({case: {...}}); WORKDIR/CASE/hf is each case's HF model (the CLI tests reuse them).
"""

import json
import sys
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=200)
TOKENS = dict(batch=2, length=24)

# name: (config class, config keys, save_pretrained's max_shard_size or None, export's max shard size or None)
CASES = {
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4, rope_theta=10000.0), None, None),
    "llama-gqa-sharded": ("LlamaConfig", dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0),
                          "40KB", "40KB"),
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True), None, None),
    # a tied checkpoint that also stores lm_head, and an old checkpoint's RoPE buffer: read by nobody, ignored
    "llama-tied-extras": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True), None, None),
    "llama-bias": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True), None, None),
    "llama-head-dim": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=24), None, None),
    "llama-rope-linear": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0)), None, None),
    "llama-rope-llama3": ("LlamaConfig", dict(num_key_value_heads=2, max_position_embeddings=1024, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=2.0, high_freq_factor=8.0,
        original_max_position_embeddings=64)), None, None),
    "llama-rope-yarn": ("LlamaConfig", dict(num_key_value_heads=2, max_position_embeddings=256, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=16.0,
        beta_slow=2.0)), None, None),
    "llama-rope-dynamic": ("LlamaConfig", dict(num_key_value_heads=2, max_position_embeddings=256, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)), None, None),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None), None, None),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, rope_theta=1000000.0), None, None),
    "qwen2-tied": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True), None, "30KB"),
    "glm": ("GlmConfig", dict(num_key_value_heads=2, head_dim=16, pad_token_id=None, eos_token_id=None), None, None),
    "glm-mha-no-bias": ("GlmConfig", dict(num_key_value_heads=4, head_dim=24, attention_bias=False, pad_token_id=None,
                                          eos_token_id=None), None, None),
}


def make_hf_model(case: str, directory: Path):
    import torch
    import transformers

    cls, keys, shard, _ = CASES[case]
    config = getattr(transformers, cls)(**SHAPE, **keys)
    torch.manual_seed(sum(map(ord, case)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kwargs)
    if case.endswith("extras"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(SHAPE["hidden_size"] // 8)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return model


def safetensors_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def run_case(case: str, work: Path) -> dict:
    import torch
    import transformers

    from megalign.checkpoint import load_weights
    from megalign.convert import export_hf, import_hf
    from megalign.convert.convert import build_full_model, forward_logits

    base = work / case
    hf_dir, imported, exported = base / "hf", base / "imported", base / "exported"
    hf_model = make_hf_model(case, hf_dir)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (TOKENS["batch"], TOKENS["length"]), generator=g)
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits

    summary = import_hf(hf_dir, imported)
    model_cfg = summary["model"]
    model = build_full_model(model_cfg, torch.float32)
    load_weights(model, imported, model_cfg)
    ours = forward_logits(model, tokens, SHAPE["vocab_size"])
    loss = training_loss_against_transformers(model, hf_model, tokens)

    _, _, _, export_shard = CASES[case]
    export_hf(imported, exported, max_shard_size=export_shard or "5GB")
    original, written = safetensors_dir(hf_dir), safetensors_dir(exported)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    with torch.no_grad():
        reloaded_logits = reloaded.eval()(tokens).logits
    return {
        "architecture": summary["architecture"],
        "hf_files": sorted(p.name for p in hf_dir.glob("*.safetensors*")),
        "exported_files": sorted(p.name for p in exported.iterdir()),
        "ignored": summary["ignored"],
        "logits_max_abs_diff": float((ours - hf_logits).abs().max()),
        "logits_max": float(hf_logits.abs().max()),
        "names_only_in_original": sorted(set(original) - set(written)),
        "names_only_in_export": sorted(set(written) - set(original)),
        "unequal_tensors": sorted(n for n in set(original) & set(written)
                                  if original[n].dtype != written[n].dtype or not torch.equal(original[n], written[n])),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
        "reloaded_logits_max_abs_diff": float((reloaded_logits - hf_logits).abs().max()),
        "reloaded_config": {k: getattr(reloaded.config, k, None) for k in ("model_type", "tie_word_embeddings")},
        "model_yaml": (imported / "model.yaml").read_text(),
        "generation_config": {name: json.loads((d / "generation_config.json").read_text())
                              for name, d in (("original", hf_dir), ("exported", exported))},
        **loss,
    }


def training_loss_against_transformers(model, hf_model, tokens) -> dict:
    """megalign's training loss (labels given: megatron's cross-entropy over the padded vocabulary, 200 -> 256) and
    its gradient on the output layer, against transformers' loss and gradient on the original model."""
    import torch
    import torch.nn.functional as F

    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    model.zero_grad()
    ours = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels)[:, :-1]  # [b, s-1]
    ours.sum().backward()
    hf_model.zero_grad()
    logits = hf_model(tokens).logits[:, :-1]
    theirs = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1), reduction="none")
    theirs.sum().backward()
    head = dict(model.named_parameters()).get("output_layer.weight")
    if head is None:  # tied: the embedding is the output layer
        head = model.embedding.word_embeddings.weight
    hf_head = hf_model.get_output_embeddings().weight
    vocab = SHAPE["vocab_size"]
    return {"loss_max_abs_diff": float((ours.reshape(-1) - theirs.detach()).abs().max()),
            "loss_mean": float(theirs.mean()),
            "head_grad_max_abs_diff": float((head.grad[:vocab] - hf_head.grad).abs().max()),
            "head_grad_max": float(hf_head.grad.abs().max()),
            "padded_rows_grad_max": float(head.grad[vocab:].abs().max())}


def main():
    work, cases = Path(sys.argv[1]), sys.argv[2:] or list(CASES)
    results = {}
    for case in cases:
        try:
            results[case] = run_case(case, work)
        except Exception as e:  # one broken case must not hide the others
            results[case] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    from megalign.parallel.setup import shutdown

    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
