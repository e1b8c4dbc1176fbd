"""Import a Hugging Face safetensors model into a megalign weights checkpoint, and export one back.

Both run in one process at TP=1/PP=1 on the CPU (gloo): megatron `dist_checkpointing` checkpoints reshard on
load, so one import serves every TP/PP/DP layout, and any checkpoint exports from its full model.

    import:  config.json -> ModelConfig; safetensors, file by file -> megatron GPTModel -> save_weights(OUT)
             (+ OUT/model.yaml, OUT/hf/ with config.json and the tokenizer files)
    export:  checkpoint manifest -> ModelConfig -> GPTModel <- load_weights -> safetensors shards + config.json
             + generation_config.json (the original's token ids, plus the end-of-turn token of the chat template a
             training run was trained with)

Both write into a sibling scratch directory and replace OUT only once the new output is complete, so a conversion
that fails or is killed leaves an earlier OUT as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from megalign.config import Config, ModelConfig
from megalign.convert import generation
from megalign.convert import hf_config as hfc
from megalign.convert.hf_weights import Coverage, Piece, ignorable, megatron_parameters, plan
from megalign.convert.safetensors_io import DTYPE_NAMES, SafetensorsReader, ShardedWriter, parse_size
from megalign.errors import MegalignError, OptionError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files of a HF model directory that are not weights: kept with an import, copied into an export (`tokenizer`)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.tiktoken", "generation_config.json")
HF_DIR = generation.IMPORT_HF_DIR  # OUT/hf/: the source's config.json and tokenizer files (training, export)
MODEL_YAML = "model.yaml"
GENERATION_CONFIG = generation.GENERATION_CONFIG
# siblings of OUT: the new output while it is written, and the old one between the two renames that replace it
SCRATCH_PREFIX, ASIDE_PREFIX = ".convert-new-", ".convert-old-"


# -- one process, TP=1/PP=1 ----------------------------------------------------------------------------
def _single_process(model_cfg: ModelConfig) -> None:
    """torch.distributed (gloo, world 1) and megatron's groups at TP=1/PP=1; reused by later calls."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(), torch.distributed.get_world_size())
        if sizes != (1, 1, 1):
            raise MegalignError("conversion runs in one process at TP=1/PP=1 (megatron is initialised otherwise)")
        return
    if torch.cuda.is_available():
        raise MegalignError("conversion runs on the CPU; hide the GPUs (CUDA_VISIBLE_DEVICES=) as "
                            "tools/convert_checkpoint.py does")
    from megalign.parallel.setup import initialize

    initialize(Config(model=model_cfg), "cpu")


def build_full_model(model_cfg: ModelConfig, dtype: torch.dtype, random_init: bool = False):
    """The whole model (TP=1/PP=1) on the CPU, parameters in `dtype` (norms stay fp32, as megatron keeps them)."""
    from megalign.model.build import build_model

    _single_process(model_cfg)
    cfg = Config(model=model_cfg)
    return build_model(cfg, "sdpa", dtype, random_init=random_init).eval()


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [b, s, vocab_size] of a full model for token ids [b, s] (positions 0.., plain causal attention)."""
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    return logits[..., :vocab_size]


def check_model_rules(model_cfg: ModelConfig, source: str) -> None:
    """The trainer's own rules for model.* (megalign.config.validate), so an import never makes a checkpoint
    that training would refuse."""
    from megalign.config import validate

    try:
        validate(Config(model=dataclasses.replace(model_cfg)), 1, with_data=False)
    except MegalignError as e:
        raise MegalignError(f"{source} maps to a model megalign cannot train yet: {e}") from None


# -- import ----------------------------------------------------------------------------------------------
def _import_dtype(requested: str, dtypes: set[str]) -> torch.dtype:
    if requested != "auto":
        if requested not in ("float32", "bfloat16"):
            raise OptionError("dtype", f"{requested}: import stores float32 or bfloat16 (or auto)")
        return TORCH_DTYPES[requested]
    if dtypes == {"BF16"}:
        return torch.bfloat16
    unknown = dtypes - set(DTYPE_NAMES)
    if unknown:
        raise MegalignError(f"safetensors dtype {sorted(unknown)[0]} is not a float type megalign reads")
    return torch.float32  # fp32, and fp16 (fp16 -> fp32 is exact; bf16 would lose precision)


def _check_tensors(pieces: list[Piece], found: dict, model_cfg: ModelConfig, arch: str, directory: Path) -> list[str]:
    """Every tensor the config implies is there with its shape, and nothing else is; the ignored names."""
    wanted = {p.hf: p for p in pieces}
    missing = [name for name in wanted if name not in found]
    ignored = [name for name in found if name not in wanted and ignorable(name, model_cfg)]
    unexpected = [name for name in found if name not in wanted and name not in ignored]
    if missing:
        raise MegalignError(f"{directory}: {len(missing)} tensor(s) that config.json implies for {arch} are missing: "
                            + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        raise MegalignError(f"{directory}: {len(unexpected)} tensor(s) are not part of a {arch} with this config.json "
                            "(left over, nothing would read them): " + ", ".join(unexpected[:6])
                            + (" ..." if len(unexpected) > 6 else ""))
    for name, piece in wanted.items():
        shape = found[name][0]
        if shape != piece.hf_shape:
            raise MegalignError(f"{directory}: {name} has shape {list(shape)}, config.json implies "
                                f"{list(piece.hf_shape)}")
    return ignored


def _training_checkpoints_around(out: Path) -> Path | None:
    """The checkpoint directory of a training run that `out` is or lies inside (a directory holding
    step_*/megalign.json of kind "training"), or None."""
    for directory in (out, *out.parents):
        if not directory.is_dir():
            continue
        for manifest in directory.glob("step_*/megalign.json"):
            try:
                kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if kind == "training":
                return directory
    return None


def _prepare_output(out: Path, overwrite: bool, what: str) -> None:
    """Check that `out` may receive the new output. Removes nothing: `_replacing` swaps the new one in."""
    aside = out.parent / f"{ASIDE_PREFIX}{out.name}"
    if aside.is_dir() and not out.exists():
        os.replace(aside, out)  # a replace killed between its two renames: the old output is whole, put it back
    if what == "import":
        run = _training_checkpoints_around(out.resolve())
        if run is not None:
            where = "is" if run == out.resolve() else f"is inside {run},"
            raise OptionError("out", f"{out} {where} the checkpoint directory of a training run (nothing removed); "
                              "an import there would replace or mix with its checkpoints: choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OptionError("out", f"{out} exists and is not empty; choose a new one or set {{overwrite}}",
                              mentions=("overwrite",))
        looks_ours = (out / "config.json").is_file() if what == "export" else (
            (out / MODEL_YAML).is_file() or (out / "latest").is_file() or any(out.glob("step_*")))
        if not looks_ours:
            raise OptionError("overwrite", f"is set, but {out} does not look like an earlier {what} (nothing "
                              "removed); choose a new {out}", mentions=("out",))


@contextmanager
def _replacing(out: Path):
    """A fresh scratch directory beside `out` to write the new output into. When the block completes, the new
    output takes the place of `out` (the old one renamed aside, the new one renamed in, then the old removed); when
    it fails, the scratch is removed and `out` is untouched. A kill leaves `out` whole, or (between the renames)
    the old output aside, which the next conversion to `out` puts back."""
    scratch, aside = out.parent / f"{SCRATCH_PREFIX}{out.name}", out.parent / f"{ASIDE_PREFIX}{out.name}"
    if scratch.exists():
        shutil.rmtree(scratch)  # left by a conversion that was killed
    scratch.mkdir(parents=True)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if aside.exists():
        shutil.rmtree(aside)  # an older output, left by a replace killed after the new one was in place
    if out.exists():
        os.replace(out, aside)
    os.replace(scratch, out)
    shutil.rmtree(aside, ignore_errors=True)


def _copy_side_files(source: Path, target: Path, names=TOKENIZER_FILES) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def _write_model_yaml(path: Path, model_cfg: ModelConfig, header: str) -> None:
    from omegaconf import OmegaConf

    fields = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "preset"}
    text = OmegaConf.to_yaml(OmegaConf.create({"model": fields}))
    path.write_text(header + text)


def import_hf(hf_dir: str | Path, out: str | Path, dtype: str = "auto", max_position_embeddings: int | None = None,
              overwrite: bool = False) -> dict:
    """A HF safetensors model -> a megalign "weights" checkpoint under `out` (out/step_0000000, out/latest),
    with out/model.yaml (the model section of a training config) and out/hf/ (config.json, tokenizer files)."""
    started = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out)
    hf = hfc.read_hf_config(hf_dir)
    model_cfg, arch = hfc.hf_to_model_config(hf, max_position_embeddings)
    check_model_rules(model_cfg, f"{hf_dir / 'config.json'}")
    padded = model_cfg.padded_vocab_size
    pieces, padding = plan(model_cfg, arch, padded)
    reader = SafetensorsReader(hf_dir)
    found = reader.metadata()
    ignored = _check_tensors(pieces, found, model_cfg, arch, hf_dir)
    params_dtype = _import_dtype(dtype, {found[p.hf][1] for p in pieces})
    _prepare_output(out, overwrite, "import")

    from megalign.checkpoint.store import step_dir_name

    with _replacing(out) as scratch:
        model, kept = _import_into(scratch, out, hf_dir, hf, arch, model_cfg, params_dtype, pieces, padding, reader)
    return {"architecture": arch, "checkpoint": str(out / step_dir_name(0)), "model_yaml": str(out / MODEL_YAML),
            "hf_files": kept, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(params_dtype).removeprefix("torch."), "vocab_size": model_cfg.vocab_size,
            "padded_vocab_size": padded, "ignored": ignored, "seconds": time.perf_counter() - started,
            "model": model_cfg}


def _import_into(scratch: Path, out: Path, hf_dir: Path, hf: dict, arch: str, model_cfg: ModelConfig,
                 params_dtype: torch.dtype, pieces: list[Piece], padding, reader: SafetensorsReader):
    """The import's files, written into `scratch` (the new `out`); the model and the files kept in hf/."""
    model = build_full_model(model_cfg, params_dtype)
    coverage = Coverage(megatron_parameters(model))
    by_name = {p.hf: p for p in pieces}
    with torch.no_grad():
        for pad in padding:
            coverage.region(pad.megatron, pad.region).zero_()
        for _, tensors in reader.iter_files():
            for name, tensor in tensors:
                piece = by_name.get(name)
                if piece is None:
                    continue  # an ignorable name (checked above)
                view = coverage.region(piece.megatron, piece.region)
                view.copy_(tensor.reshape(view.shape))
                del tensor
    coverage.check()

    from megalign.checkpoint import save_weights

    source = {"format": "huggingface", "path": str(hf_dir.resolve()), "architecture": arch, "hf_config": hf,
              "dtype": str(params_dtype).removeprefix("torch.")}
    if (hf_dir / GENERATION_CONFIG).is_file():
        # in the manifest, it travels into every training checkpoint started from this one (for the export)
        source["generation_config"] = generation.read_json(hf_dir / GENERATION_CONFIG)
    save_weights(model, scratch, model_cfg, source=source)
    kept = _copy_side_files(hf_dir, scratch / HF_DIR, ("config.json",) + TOKENIZER_FILES)
    header = (f"# The model of {hf_dir} ({arch}), imported by tools/convert_checkpoint.py.\n"
              f"# Train from it:  python -m megalign.train --config {out / MODEL_YAML} data.path=PREFIX "
              f"checkpoint.init_from={out}\n")
    _write_model_yaml(scratch / MODEL_YAML, model_cfg, header)
    return model, kept


# -- export ----------------------------------------------------------------------------------------------
def _checkpoint_dtype(path: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    tensor = metadata.get("embedding.word_embeddings.weight")
    return tensor.dtype if tensor is not None else torch.float32


def _export_architecture(requested: str, base: dict | None, source: dict, model_cfg: ModelConfig) -> str:
    if requested != "auto":
        if requested not in hfc.ARCHITECTURES:
            raise OptionError("architecture", f"{requested} is not supported; valid: auto, "
                                + ", ".join(hfc.ARCHITECTURES))
        return requested
    if base is not None:
        return hfc.architecture_of(base)
    if source.get("architecture") in hfc.ARCHITECTURES:
        return source["architecture"]
    return hfc.infer_architecture(model_cfg)


def export_hf(checkpoint: str | Path, out: str | Path, architecture: str = "auto", dtype: str = "auto",
              hf_config: str | Path | None = None, tokenizer: str | Path | None = None,
              max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict:
    """A megalign checkpoint (weights or training; a root means its newest) -> a HF model directory that
    `transformers.AutoModelForCausalLM.from_pretrained` loads: safetensors (sharded above `max_shard_size`,
    with model.safetensors.index.json) and config.json; the tokenizer files of `tokenizer` when given.

    config.json keeps the non-model keys (token ids, ...) of `hf_config` (a config.json or a directory with one;
    by default the one an import recorded in the checkpoint's manifest). generation_config.json is the original's
    (beside `hf_config`, among the `tokenizer` files, or recorded by the import); for a training checkpoint its
    eos_token_id also holds the token that ends an assistant turn in the run's chat template (read from the
    training data's PREFIX.json). The summary's "generation" says which, or why the template is unknown."""
    started = time.perf_counter()
    from megalign.checkpoint import read_manifest, resolve

    path = resolve(checkpoint)
    out = Path(out)
    manifest = read_manifest(path)
    model_cfg = hfc.model_config_from_identity(manifest["model"])
    padded = int(manifest["model"]["padded_vocab_size"])
    if model_cfg.vocab_size is None or model_cfg.padded_vocab_size != padded:
        raise MegalignError(f"checkpoint {path}: vocab_size {model_cfg.vocab_size} does not give its padded "
                            f"vocabulary {padded}; the manifest is inconsistent")
    source = manifest.get("source") or {}
    base = hfc.read_hf_config(hf_config) if hf_config is not None else source.get("hf_config")
    arch = _export_architecture(architecture, base, source, model_cfg)
    stored = _checkpoint_dtype(path)
    if dtype == "auto":
        out_dtype = stored
    elif dtype in TORCH_DTYPES:
        out_dtype = TORCH_DTYPES[dtype]
    else:
        raise OptionError("dtype", f"{dtype}: one of auto, {', '.join(TORCH_DTYPES)}")
    dtype_name = str(out_dtype).removeprefix("torch.")
    config = hfc.model_config_to_hf(model_cfg, arch, dtype_name, base)
    shard_bytes = parse_size(max_shard_size)
    tokenizer_source = _tokenizer_files(tokenizer) if tokenizer is not None else []

    original = generation.original_generation_config(hf_config, tokenizer_source, source, path, manifest["kind"])
    generation_cfg, generation_note = generation.generation_config(original, config, manifest, tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is None and generation_cfg.get(key) is not None:
            config[key] = generation_cfg[key]  # no original id to keep: the one generation uses
    _prepare_output(out, overwrite, "export")

    model = build_full_model(model_cfg, stored)
    from megalign.checkpoint import load_weights

    load_weights(model, path, model_cfg)
    params = megatron_parameters(model)
    pieces, _ = plan(model_cfg, arch, padded)

    with _replacing(out) as scratch:
        writer = ShardedWriter(scratch, shard_bytes)
        with torch.no_grad():
            for piece in pieces:
                tensor = piece.region(params[piece.megatron]).reshape(piece.hf_shape)
                # a copy: safetensors refuses tensors that share storage (q, k and v are views of one parameter)
                writer.add(piece.hf, tensor.to(out_dtype, copy=True))
        files = writer.close() + ["config.json"]
        (scratch / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if generation_cfg:
            (scratch / GENERATION_CONFIG).write_text(json.dumps(generation_cfg, indent=2, sort_keys=True) + "\n")
            files.append(GENERATION_CONFIG)
        for file in tokenizer_source:
            if file.name != GENERATION_CONFIG:  # written above, from the original's
                shutil.copy2(file, scratch / file.name)
                files.append(file.name)
    return {"architecture": arch, "out": str(out), "files": files, "dtype": dtype_name,
            "checkpoint": str(path), "kind": manifest["kind"], "step": manifest["step"],
            "generation": generation_note, "bytes": writer.total_bytes, "seconds": time.perf_counter() - started}


def _tokenizer_files(tokenizer: str | Path) -> list[Path]:
    tokenizer = Path(tokenizer)
    if tokenizer.is_file():
        return [tokenizer]
    if not tokenizer.is_dir():
        raise OptionError("tokenizer", f"{tokenizer}: no such file or directory")
    files = [tokenizer / name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    if not files:
        raise OptionError("tokenizer", f"{tokenizer}: none of {', '.join(TOKENIZER_FILES[:4])} ... found")
    return files


__all__ = ["import_hf", "export_hf", "build_full_model", "forward_logits"]
