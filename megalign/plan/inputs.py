"""What the planner is asked about, from a command line's options: the config (a preset, a Hugging Face
config.json or a megalign YAML, with `key=value` overrides) and the workload (a dataset or a pack length)."""

from __future__ import annotations

import dataclasses

from megalign.config import Config, load_config, resolve
from megalign.errors import MegalignError, OptionError
from megalign.plan.workload import Workload, fixed_length, from_dataset, mixture


def load_plan_config(preset: str | None = None, hf_config: str | None = None, config: str | None = None,
                     overrides: list[str] = ()) -> Config:
    """Exactly one of preset, hf_config, config names the model; overrides apply on top (model.* keys too)."""
    given = [name for name, value in (("preset", preset), ("hf_config", hf_config), ("config", config)) if value]
    if len(given) != 1:
        raise OptionError(None, "give exactly one of {preset}, {hf_config}, {config} (the model to plan for)",
                          mentions=("preset", "hf_config", "config"))
    if preset:
        from megalign.model.presets import PRESETS

        if preset not in PRESETS:
            raise OptionError("preset", f"{preset!r} is unknown; one of {', '.join(PRESETS)}")
        return load_config(None, [f"model.preset={preset}", *overrides])
    if config:
        return load_config(config, list(overrides))
    from megalign.convert.hf_config import hf_to_model_config, read_hf_config

    model, _ = hf_to_model_config(read_hf_config(hf_config))
    cfg = load_config(None, list(overrides))
    overridden = {o.split("=", 1)[0].removeprefix("model.") for o in overrides if o.startswith("model.")}
    if "preset" in overridden:
        raise MegalignError("config key model.preset cannot be combined with --hf-config (which is the model)")
    keys = {k: getattr(cfg.model, k) for k in overridden if hasattr(cfg.model, k)}
    return dataclasses.replace(cfg, model=dataclasses.replace(model, **keys))


def load_workload(cfg: Config, data: str | None = None, seq_length: int | None = None) -> Workload:
    """--data PREFIX, --seq-length N, or else the config's data.path (weighted by data.weights)."""
    if data and seq_length:
        raise OptionError(None, "give {data} or {seq_length}, not both", mentions=("data", "seq_length"))
    if seq_length is not None:
        return fixed_length(seq_length)
    if data:
        return from_dataset(data)
    if cfg.data.path is not None:
        return mixture([from_dataset(p) for p in cfg.data_paths], cfg.data.weights)
    raise OptionError(None, "give {data} PREFIX (a dataset made by tools/preprocess_data.py) or {seq_length} N "
                      "(tokens per pack)", mentions=("data", "seq_length"))


def resolved(cfg: Config, workload: Workload) -> Config:
    """The config with its vocabulary (model.vocab_size, else the dataset tokenizer's) and derived keys filled."""
    if cfg.model.vocab_size is None and workload.vocab_size is None:
        raise OptionError(None, "config key model.vocab_size is unset: set it (e.g. model.vocab_size=32000), or give "
                          "{data} PREFIX to take its tokenizer's vocabulary", mentions=("data",))
    return resolve(cfg, workload.vocab_size)
