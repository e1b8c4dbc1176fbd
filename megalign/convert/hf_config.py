"""Hugging Face config.json <-> ModelConfig for the architectures megalign converts.

Import reads config.json as plain JSON (no transformers needed), fills in each architecture's defaults the way its
transformers config class does, and refuses, in one line naming the config.json key, anything that megalign's
model would compute differently (a sliding window in use, a RoPE type it lacks, biases it cannot place, ...).
Export writes a config.json that transformers 4.x and 5.x both read (legacy `rope_theta`/`rope_scaling` and
5.x's `rope_parameters`, consistent with each other) and checks that it maps back to the same ModelConfig.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from megalign.config import ModelConfig
from megalign.errors import MegalignError, OptionError

# architecture -> model_type, and the defaults of its transformers config class for keys a config.json may omit
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GlmForCausalLM": "glm",
}
_COMMON_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                        attention_dropout=0.0, initializer_range=0.02, head_dim=None, partial_rotary_factor=1.0)
DEFAULTS: dict[str, dict] = {
    "llama": dict(_COMMON_DEFAULTS, max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    "mistral": dict(_COMMON_DEFAULTS, max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(_COMMON_DEFAULTS, max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
    "glm": dict(_COMMON_DEFAULTS, max_position_embeddings=131072, rms_norm_eps=1.5625e-07, attention_bias=True,
                head_dim=128, partial_rotary_factor=0.5),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
HF_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "ntk", "yarn": "yarn", "llama3": "llama3"}
DTYPES = ("float32", "bfloat16", "float16")


def _supported() -> str:
    return ", ".join(ARCHITECTURES)


def read_hf_config(path: str | Path) -> dict:
    """config.json of a Hugging Face model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise MegalignError(f"{path}: no such file or directory (a Hugging Face model directory, or its config.json)")
    if not file.is_file():
        raise MegalignError(f"{path}: no config.json there (a Hugging Face model directory holds one)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MegalignError(f"{file}: not valid JSON ({e})") from None


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise MegalignError(f"config.json architectures={archs!r}: expected exactly one of {_supported()}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise MegalignError(f"config.json architectures=[{arch!r}] is not supported; megalign converts {_supported()}")
    model_type = hf.get("model_type", ARCHITECTURES[arch])
    if model_type != ARCHITECTURES[arch]:
        raise MegalignError(f"config.json model_type={model_type!r} does not match architectures=[{arch!r}] "
                            f"(expected {ARCHITECTURES[arch]!r})")
    return arch


def _rope_parameters(hf: dict, defaults: dict) -> dict:
    """The RoPE parameters as transformers 5 standardises them: `rope_scaling` (legacy) wins over
    `rope_parameters`; rope_theta and partial_rotary_factor from the dict, else top level, else the default."""
    legacy, new = hf.get("rope_scaling"), hf.get("rope_parameters")
    key = "rope_scaling" if legacy else "rope_parameters"
    params = dict(legacy or new or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise MegalignError(f"config.json {key} holds one RoPE per layer type ({', '.join(params)}); megalign has one "
                            "RoPE for every layer")
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    params.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", defaults["partial_rotary_factor"]))
    params["_key"] = key
    return params


def _rope_fields(params: dict, max_positions: int) -> dict:
    key, rope_type = params["_key"], params["rope_type"]
    if rope_type not in HF_ROPE_TYPES:
        raise MegalignError(f"config.json {key}.rope_type={rope_type!r} is not supported; megalign has "
                            f"{', '.join(HF_ROPE_TYPES)}")
    fields = dict(rotary_base=float(params["rope_theta"]), rope_scaling=HF_ROPE_TYPES[rope_type])
    if rope_type == "default":
        return fields
    factor = params.get("factor")
    if rope_type == "yarn":
        original = params.get("original_max_position_embeddings") or max_positions
        factor = factor if factor is not None else max_positions / original
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # HF's DeepSeek-style attention factor
            def get_mscale(scale, m):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        if params.get("truncate", True) is not True:
            raise MegalignError(f"config.json {key}.truncate=false (YaRN without rounding the correction range) is "
                                "not supported; megalign's yarn rounds it as truncate=true does")
        fields.update(rope_original_max_position_embeddings=int(original),
                      rope_beta_fast=float(params.get("beta_fast") or 32.0),
                      rope_beta_slow=float(params.get("beta_slow") or 1.0),
                      rope_attention_factor=None if attention_factor is None else float(attention_factor))
    elif rope_type == "llama3":
        fields.update(rope_original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                                                or max_positions),
                      rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                      rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)))
    elif rope_type == "dynamic":
        # HF's dynamic NTK takes config.max_position_embeddings as the trained length (and ignores
        # original_max_position_embeddings): up to it RoPE is unscaled, beyond it the base grows. megalign's ntk
        # fixes the base at model.max_position_embeddings against this length (see megalign/model/rope.py).
        fields.update(rope_original_max_position_embeddings=int(max_positions))
    if factor is None:
        raise MegalignError(f"config.json {key}.factor is missing (rope_type {rope_type!r} needs it)")
    fields["rope_scaling_factor"] = float(factor)
    return fields


def _sliding_window_in_use(hf: dict, model_type: str, defaults: dict, layers: int) -> int | None:
    """The window of the layers that use one, or None when every layer attends to the full causal prefix."""
    window = hf.get("sliding_window", defaults.get("sliding_window"))
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", defaults["use_sliding_window"]):
            return None  # transformers sets sliding_window=None then
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                          "full_attention" for i in range(layers)]
        return window if "sliding_attention" in types else None
    if model_type == "mistral":
        return window
    if hf.get("layer_types") and "sliding_attention" in hf["layer_types"]:
        return window
    return None


def hf_to_model_config(hf: dict, max_position_embeddings: int | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) of a config.json, or a MegalignError naming the key megalign cannot honour.

    `max_position_embeddings` lowers the model's context (e.g. to a sliding window, below which full causal
    attention is exact)."""
    arch = architecture_of(hf)
    model_type = ARCHITECTURES[arch]
    d = DEFAULTS[model_type]
    missing = [k for k in REQUIRED if hf.get(k) is None]
    if missing:
        raise MegalignError(f"config.json {missing[0]} is missing")
    if hf.get("quantization_config"):
        raise MegalignError("config.json quantization_config is set: quantized checkpoints are not supported; "
                            "convert the unquantized (bf16/fp32) model")
    get = lambda k: hf[k] if hf.get(k) is not None else d.get(k)  # noqa: E731
    act = get("hidden_act")
    if act != "silu":
        raise MegalignError(f"config.json hidden_act={act!r} is not supported; megalign's gated MLP uses 'silu' "
                            "(swiglu)")
    heads, layers, hidden = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"]), int(hf["hidden_size"])
    groups = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or hidden // heads)
    if heads % groups:
        raise MegalignError(f"config.json num_key_value_heads={groups} does not divide num_attention_heads={heads}")

    hf_max = int(get("max_position_embeddings"))
    max_positions = hf_max
    if max_position_embeddings is not None:
        if max_position_embeddings > hf_max:
            raise OptionError("max_position_embeddings", f"{max_position_embeddings} is larger than config.json "
                              f"max_position_embeddings={hf_max}")
        max_positions = max_position_embeddings
    window = _sliding_window_in_use(hf, model_type, d, layers)
    if window is not None and window < max_positions:
        raise OptionError(
            None,
            f"config.json sliding_window={window} is in use and smaller than max_position_embeddings="
            f"{max_positions}: megalign attends to the whole causal prefix; import with {{max_position_embeddings}} "
            f"{window} (exact up to the window), or set sliding_window to null if the model was trained without it",
            mentions=("max_position_embeddings",))

    params = _rope_parameters(hf, d)
    partial = float(params["partial_rotary_factor"])
    interleaved = model_type == "glm"
    if partial != 1.0 and model_type != "glm":
        raise MegalignError(f"config.json partial_rotary_factor={partial}: {arch} rotates the whole head; "
                            "only GlmForCausalLM has partial rotary")
    rope = _rope_fields(params, hf_max)

    qkv_bias, bias_linear = False, False
    if model_type == "llama":
        attention_bias, mlp_bias = bool(get("attention_bias")), bool(get("mlp_bias"))
        if attention_bias != mlp_bias:
            raise MegalignError(
                f"config.json attention_bias={str(attention_bias).lower()} with mlp_bias={str(mlp_bias).lower()}: "
                "megatron has biases on every linear layer (both true) or on none (both false)")
        bias_linear = attention_bias
    elif model_type == "qwen2":
        qkv_bias = True  # Qwen2's q/k/v projections always have a bias, o_proj and the MLP never
    elif model_type == "glm":
        qkv_bias = bool(get("attention_bias"))

    cfg = ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        vocab_size=int(hf["vocab_size"]),
        normalization="RMSNorm",
        norm_epsilon=float(get("rms_norm_eps")),
        activation="swiglu",
        add_qkv_bias=qkv_bias,
        add_bias_linear=bias_linear,
        tie_embeddings=bool(get("tie_word_embeddings")),
        rotary_percent=partial,
        rotary_interleaved=interleaved,
        max_position_embeddings=max_positions,
        init_method_std=float(get("initializer_range")),
        attention_dropout=float(get("attention_dropout") or 0.0),
        **rope,
    )
    return cfg, arch


def infer_architecture(m: ModelConfig) -> str:
    """The HF architecture a ModelConfig most naturally exports to (Mistral only when asked for)."""
    if m.rotary_interleaved:
        return "GlmForCausalLM"
    if m.add_qkv_bias and not m.add_bias_linear:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _check_exportable(m: ModelConfig, arch: str) -> None:
    def refuse(why: str):
        raise OptionError("architecture", f"{arch}: {why}")

    model_type = ARCHITECTURES[arch]
    if m.normalization != "RMSNorm" or m.activation != "swiglu":
        refuse(f"needs RMSNorm and swiglu, the checkpoint has {m.normalization} and {m.activation}")
    if model_type == "glm":
        if not m.rotary_interleaved:
            refuse("GLM rotates interleaved pairs; the checkpoint's model.rotary_interleaved is false")
        if m.add_bias_linear:
            refuse("GLM has no o_proj/MLP biases; the checkpoint has model.add_bias_linear=true")
        return
    if m.rotary_interleaved or m.rotary_percent != 1.0:
        refuse(f"rotates the whole head in halves; the checkpoint has rotary_percent={m.rotary_percent}, "
               f"rotary_interleaved={m.rotary_interleaved} (GlmForCausalLM has those)")
    if model_type == "qwen2" and (not m.add_qkv_bias or m.add_bias_linear):
        refuse("Qwen2 has biases on q/k/v only (model.add_qkv_bias=true, model.add_bias_linear=false)")
    if model_type in ("llama", "mistral") and m.add_qkv_bias and not m.add_bias_linear:
        refuse("biases on q/k/v only cannot be written as Llama/Mistral; use Qwen2ForCausalLM")
    if model_type == "mistral" and m.add_bias_linear:
        refuse("Mistral has no biases; use LlamaForCausalLM (attention_bias/mlp_bias)")


def _rope_to_hf(m: ModelConfig) -> dict:
    kind = {v: k for k, v in HF_ROPE_TYPES.items()}[m.rope_scaling]
    params = {"rope_type": kind}
    if m.rope_scaling != "none":
        params["factor"] = m.rope_scaling_factor
    if m.rope_scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = (m.rope_original_max_position_embeddings
                                                      or m.max_position_embeddings)
    if m.rope_scaling == "llama3":
        params.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor)
    if m.rope_scaling == "yarn":
        params.update(beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow)
        if m.rope_attention_factor is not None:
            params["attention_factor"] = m.rope_attention_factor
    return params


def _hf_max_positions(m: ModelConfig) -> int:
    """HF's dynamic NTK reads max_position_embeddings as the trained length L_orig and scales for longer inputs;
    megalign's ntk fixed the base at L = model.max_position_embeddings. Written as L_orig, HF reproduces our
    frequencies on a length-L input exactly (shorter inputs get less scaling, as HF always does)."""
    if m.rope_scaling == "ntk":
        return m.rope_original_max_position_embeddings or m.max_position_embeddings
    return m.max_position_embeddings


def _as_hf_sees_it(m: ModelConfig) -> ModelConfig:
    if m.rope_scaling == "ntk":
        return dataclasses.replace(m, max_position_embeddings=_hf_max_positions(m),
                                   rope_original_max_position_embeddings=_hf_max_positions(m))
    return m


# keys of a base config.json that describe the model: export always writes its own values for these
_MODEL_KEYS = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
               "hidden_act", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
               "partial_rotary_factor", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
               "max_window_layers", "layer_types", "torch_dtype", "dtype", "pretraining_tp", "quantization_config"}


def model_config_to_hf(m: ModelConfig, arch: str, dtype: str, base: dict | None = None) -> dict:
    """config.json for `m` as `arch`. Keys of `base` (the original model's config.json) that do not describe the
    model (token ids, generation defaults) are kept."""
    if arch not in ARCHITECTURES:
        raise OptionError("architecture", f"{arch} is not supported; valid: {_supported()}")
    _check_exportable(m, arch)
    model_type = ARCHITECTURES[arch]
    heads = m.num_attention_heads
    rope = _rope_to_hf(m)
    hf = {k: v for k, v in (base or {}).items() if k not in _MODEL_KEYS}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf.setdefault(key, None)
    hf.update(
        architectures=[arch],
        model_type=model_type,
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=m.query_groups,
        head_dim=m.head_dim,
        max_position_embeddings=_hf_max_positions(m),
        rms_norm_eps=m.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_method_std,
        attention_dropout=m.attention_dropout,
        rope_theta=m.rotary_base,
        # transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters (and rope_scaling first): same values
        rope_scaling=None if m.rope_scaling == "none" else dict(rope),
        rope_parameters=dict(rope, rope_theta=m.rotary_base),
        torch_dtype=dtype,
        dtype=dtype,
        use_cache=True,
    )
    if model_type == "llama":
        hf.update(attention_bias=m.add_bias_linear, mlp_bias=m.add_bias_linear, pretraining_tp=1)
    elif model_type == "mistral":
        hf.update(sliding_window=None)
    elif model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    elif model_type == "glm":
        hf.update(attention_bias=m.add_qkv_bias, partial_rotary_factor=m.rotary_percent)
        hf["rope_parameters"]["partial_rotary_factor"] = m.rotary_percent
    again, _ = hf_to_model_config(hf)
    differences = model_config_differences(_as_hf_sees_it(m), again)
    if differences:  # a mapping bug, never a user error
        raise AssertionError(f"config.json for {arch} does not map back: {'; '.join(differences)}")
    return hf


# the ModelConfig keys that config.json carries (the rest are training choices: backend, recompute, dropout ...)
HF_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
           "vocab_size", "normalization", "norm_epsilon", "activation", "add_qkv_bias", "add_bias_linear",
           "tie_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved", "rope_scaling",
           "max_position_embeddings")
_ROPE_KEYS = {"linear": ("rope_scaling_factor",), "ntk": ("rope_scaling_factor",),
              "llama3": ("rope_scaling_factor", "rope_original_max_position_embeddings", "rope_low_freq_factor",
                         "rope_high_freq_factor"),
              "yarn": ("rope_scaling_factor", "rope_original_max_position_embeddings", "rope_beta_fast",
                       "rope_beta_slow", "rope_attention_factor")}


def model_config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    def norm(m: ModelConfig, key: str):
        value = getattr(m, key)
        if key == "num_query_groups":
            return value or m.num_attention_heads
        if key == "kv_channels":
            return value or m.hidden_size // m.num_attention_heads
        if key == "rope_original_max_position_embeddings" and a.rope_scaling in ("yarn", "llama3"):
            return value or m.max_position_embeddings
        return value

    keys = HF_KEYS + _ROPE_KEYS.get(a.rope_scaling, ())
    return [f"model.{k}: {norm(a, k)!r} vs {norm(b, k)!r}" for k in keys if norm(a, k) != norm(b, k)]


def model_config_from_identity(identity: dict) -> ModelConfig:
    """The ModelConfig of a checkpoint manifest's `model` section (unknown keys ignored, for older manifests)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in identity.items() if k in names})
