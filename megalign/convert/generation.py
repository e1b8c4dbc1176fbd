"""generation_config.json of an export: the original model's token ids, plus the tokens that end an assistant turn
in the chat template a training run was trained with, so that `generate` stops where the model learned to stop."""

from __future__ import annotations

import json
from pathlib import Path

from megalign.data.packed_dataset import read_metadata
from megalign.errors import MegalignError

GENERATION_CONFIG = "generation_config.json"
IMPORT_HF_DIR = "hf"  # an import's OUT/hf/ (convert.py HF_DIR)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MegalignError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise MegalignError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


def original_generation_config(hf_config, tokenizer_files: list[Path], source: dict, path: Path,
                               kind: str) -> dict | None:
    """The original model's generation_config.json: beside `hf_config`, among the tokenizer files, as the import
    recorded it in the manifest, or (an import made before imports recorded it) in the import's OUT/hf/."""
    candidates = [f for f in tokenizer_files if f.name == GENERATION_CONFIG]
    if hf_config is not None:
        given = Path(hf_config)
        candidates.insert(0, (given if given.is_dir() else given.parent) / GENERATION_CONFIG)
    for candidate in candidates:
        if candidate.is_file():
            return read_json(candidate)
    if isinstance(source.get("generation_config"), dict):
        return dict(source["generation_config"])
    legacy = path.parent / IMPORT_HF_DIR / GENERATION_CONFIG
    if kind == "weights" and source.get("format") == "huggingface" and legacy.is_file():
        return read_json(legacy)
    return None


def _end_of_turn_tokens(template: str, eos: str | None) -> list[str] | None:
    """The special tokens that end an assistant turn in a built-in chat template: those it gives the loss to
    (templates.py), found on a probe conversation; None for a template whose tokens megalign does not place (hf)."""
    from megalign.data import templates
    from megalign.data.records import Conversation, Message

    eos = eos or "</s>"  # as templates.make_encoder falls back
    pieces = templates.built_in_pieces(template, "<s>", eos)
    if pieces is None:
        return None
    probe = Conversation(tuple(Message(role, "x") for role in ("user", "assistant", "user", "assistant")))
    return list(dict.fromkeys(p.special for p in pieces(probe) if p.special is not None and p.loss))


def _tokenizer_of(recorded: dict, tokenizer_option):
    """The tokenizer a dataset was made with (if still there, unchanged), else the one exported with the model."""
    from megalign.data.tokenizer import load_tokenizer

    candidates = [(recorded.get("path"), recorded.get("sha256")), (tokenizer_option, None)]
    for where, sha256 in candidates:
        if where is None:
            continue
        try:
            tokenizer = load_tokenizer(where)
        except MegalignError:
            continue
        if sha256 is None or tokenizer.fingerprint == sha256:
            return tokenizer
    return None


def _trained_end_of_turn(manifest: dict, tokenizer_option) -> tuple[dict[str, int] | None, str]:
    """For a training checkpoint: ({token: id} of the tokens that end an assistant turn in the chat template of its
    training data, the template's name), read from each dataset's PREFIX.json; (None, why) when it cannot be known."""
    templates_seen, ends = [], {}
    for dataset in manifest.get("data") or []:
        meta_path = Path(f"{dataset.get('path')}.json")
        try:
            meta = read_metadata(str(dataset.get("path")))  # its shape checked: one line for what is wrong
        except MegalignError:
            return None, f"the training data's {meta_path} cannot be read"
        recorded = {suffix: f["sha256"] for suffix, f in meta["files"].items()}
        if recorded != dataset.get("sha256"):
            return None, f"{meta_path} now describes other data than the run was trained on"
        template = meta.get("chat_template")
        tokenizer = _tokenizer_of(meta.get("tokenizer") or {}, tokenizer_option)
        tokens = _end_of_turn_tokens(template, tokenizer.eos_token if tokenizer else None)
        if tokens is None:
            return None, f"the training data's chat template {template!r} is not one whose tokens megalign places"
        if tokenizer is None:
            return None, (f"the tokenizer of {meta_path} is gone or changed, so the ids of {', '.join(tokens)} are "
                          "unknown (export with tokenizer=DIR)")
        try:
            ends.update({token: tokenizer.special_id(token) for token in tokens})
        except MegalignError as e:
            return None, str(e)
        templates_seen.append(template)
    if not templates_seen:
        return None, "the checkpoint records no training data"
    return ends, "/".join(dict.fromkeys(templates_seen))


def _ids(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def generation_config(original: dict | None, config: dict, manifest: dict, tokenizer_option) -> tuple[dict, str]:
    """generation_config.json for the export, and one line saying where its eos_token_id comes from.

    The original's (or, without one, the token ids of config.json, which is what transformers derives), plus, for
    a training checkpoint, the tokens that end an assistant turn in its chat template: a model trained on ChatML
    ends its answers with <|im_end|>, not the tokenizer's eos, and generate() must stop there."""
    generation = dict(original or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    eos = _ids(generation.get("eos_token_id"))
    kept = f"eos_token_id {eos} from the original" if eos else "no eos_token_id (the original has none)"
    if manifest["kind"] != "training":
        return generation, f"{kept} (a {manifest['kind']} checkpoint: no chat template trained in)"
    ends, what = _trained_end_of_turn(manifest, tokenizer_option)
    if ends is None:
        return generation, (f"{kept} only: the chat template of the training run is unknown ({what}); add its "
                            f"end-of-turn token id to eos_token_id in {GENERATION_CONFIG}")
    added = {token: i for token, i in ends.items() if i not in eos}
    if not added:
        return generation, f"{kept}, which ends an assistant turn of the {what} template too"
    kept = f"{eos} from the original + " if eos else ""
    eos += list(added.values())
    generation["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    generation.pop("_from_model_config", None)  # no longer what transformers would derive from config.json
    tokens = ", ".join(f"{token} ({i})" for token, i in added.items())
    return generation, (f"eos_token_id {eos}: {kept}{tokens}, ending an assistant turn in the {what} template the "
                        "run was trained with")
