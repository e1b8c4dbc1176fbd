"""One typed config tree: YAML in, `key.sub=value` overrides on the command line, validated up-front.

Merging and type checking are OmegaConf's (structured configs); the rules between keys (divisibility,
existence of the data, valid names) are `validate`, which runs before any process group starts and reports
each problem as one line naming the key and a value that would work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megalign.errors import MegalignError, OptionError

ATTENTION_BACKENDS = ("auto", "te", "flash", "torch", "sdpa")  # model.attention_backend (model/attention.py)
OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo", "logo", "longpo")  # training.objective (training/objective.py)
# the preference objectives (training/preference.py), and those that need reference log-probs
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "logo", "longpo")
REFERENCE_OBJECTIVES = ("dpo", "ipo", "longpo")
PROMPT_MODES = ("shared", "duplicate")  # data.prompt (training/preference.py)
NONFINITE_POLICIES = ("error", "skip")  # training.on_nonfinite
LOSS_MODES = ("sequence", "token", "pack")  # training.loss: the sft objective's weighting (training/loss.py)
DEVICES = ("auto", "cpu", "cuda")
RECOMPUTE = ("none", "selective", "full")
ROPE_SCALING = ("none", "linear", "ntk", "yarn", "llama3")
POSITIONS = ("contiguous", "skipalign", "logo")  # data.positions (megalign/data/positions.py)
BALANCE_MODES = ("none", "compute")  # data.balance (megalign/training/balance.py)


@dataclass(frozen=True)
class ModelConfig:
    preset: Optional[str] = None  # a name from megalign.model.presets; keys set here override it
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups; None: one per head (MHA)
    kv_channels: Optional[int] = None  # head dim; None: hidden_size / num_attention_heads
    vocab_size: Optional[int] = None  # None: the dataset tokenizer's vocabulary
    make_vocab_size_divisible_by: int = 128  # padding is the same at every TP size (128 % tp == 0)
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | gelu
    add_qkv_bias: bool = False  # Qwen2
    add_bias_linear: bool = False
    tie_embeddings: bool = False
    rotary_base: float = 10000.0  # HF rope_theta
    rotary_percent: float = 1.0  # GLM: 0.5 (HF partial_rotary_factor)
    rotary_interleaved: bool = False  # GLM: rotate (even, odd) pairs instead of the two halves
    # RoPE scaling, named and parameterised as HF's rope_scaling / rope_parameters
    rope_scaling: str = "none"  # none | linear | ntk | yarn | llama3
    rope_scaling_factor: float = 1.0
    rope_original_max_position_embeddings: Optional[int] = None  # ntk, yarn, llama3 (None: max_position_embeddings)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: Optional[float] = None  # yarn (None: HF's default 0.1 * ln(factor) + 1)
    max_position_embeddings: int = 4096
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    attention_backend: str = "auto"  # auto | te | flash | torch | sdpa
    recompute: str = "none"  # none | selective (attention core) | full (every layer)

    # -- derived values: computed here and nowhere else ------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to make_vocab_size_divisible_by: the same at every TP size."""
        if self.vocab_size is None:
            raise MegalignError("model.vocab_size is unset: resolve the config against its data first "
                                "(megalign.config.resolve)")
        k = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // k) * k


@dataclass(frozen=True)
class DataConfig:
    path: Any = None  # a PREFIX, or a list of PREFIXes (required)
    weights: Optional[list[float]] = None  # one per path: sampling weights for mixing
    verify: str = "sizes"  # sizes | full (sha256 of every file at start)
    # position ids of each sample (megalign/data/positions.py):
    #   contiguous  0, 1, ... restarting at every sample
    #   skipalign   SkipAlign's synthesized positions: +1 inside a segment (a run of equal loss mask), a random
    #               skip where the loss mask switches, so short samples span distances up to skipalign_window
    positions: str = "contiguous"
    # skipalign: the target window W. Each sample's last position is drawn uniformly in [length-1, W-1] (samples
    # of W tokens or more stay contiguous); None: model.max_position_embeddings. At most that.
    skipalign_window: Optional[int] = None
    # skipalign: the probability that a sample gets skips (drawn per sample and epoch); the others keep
    # contiguous positions. 0: exactly contiguous
    skipalign_fraction: float = 1.0
    # logo (preference data, LOGO's Eq. 4): each group's real tokens are mapped into a window of this many positions
    # (None: model.max_position_embeddings): the prompt's chunks of logo_chunk tokens keep +1 steps inside and jump
    # between, the prompt's last chunk (the question) and the answers sit at the end of the window
    logo_window: Optional[int] = None
    logo_chunk: int = 512
    # preference groups (a prompt and its responses): shared (the prompt computed once, every response attends to
    # it and to itself) | duplicate (each response a sample of its own, prompt + response; for comparison)
    prompt: str = "shared"
    # held-out datasets for the validation loss (a PREFIX or a list, made by the same preprocessing, the same
    # tokenizer); every pack of each is evaluated, forward only, with contiguous positions
    valid_path: Any = None
    # which data-parallel rank gets which packs of a global batch:
    #   none     consecutive shares in the sampler's order
    #   compute  shares of equal modelled compute (attention is quadratic per sample: a pack of one long sample
    #            costs more than a pack of short ones of the same tokens), decided on every rank alike
    balance: str = "compute"
    # build the next step's micro-batches on a background thread while this step computes (training/prefetch.py);
    # false: build them when they are needed
    prefetch: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    distributed_optimizer: bool = True
    # megatron's sequence parallelism: the activations outside attention and MLP (norms, residuals, dropout)
    # split over the TP ranks along the sequence. None: on when tp > 1
    sequence_parallel: Optional[bool] = None
    timeout_minutes: float = 30.0  # a collective that waits longer fails the rank (a hung or lost peer ends the job)

    @property
    def sp(self) -> bool:
        """Whether sequence parallelism is on (the key, or its default: tp > 1)."""
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)


@dataclass(frozen=True)
class TrainingConfig:
    global_batch: int = 8  # packs per optimizer step (micro-batches of one pack each, over all DP ranks)
    steps: int = 100
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    objective: str = "sft"  # what a micro-batch carries for the loss and how it is reduced (training/objective.py)
    # a step whose loss or gradient norm is NaN or inf: error (stop, naming the step; nothing is updated or
    # saved) or skip (no update; metrics.jsonl marks the step `skipped`)
    on_nonfinite: str = "error"
    loss: str = "sequence"  # the sft weighting: sequence (LongAlign) | token | pack (training/loss.py)
    # preference objectives (training/preference.py); None: the objective's default (preference.DEFAULTS)
    beta: Optional[float] = None  # reward scale (dpo, ipo, simpo, logo, longpo; orpo: the odds-ratio weight)
    gamma: Optional[float] = None  # target reward margin (simpo, logo)
    label_smoothing: float = 0.0  # dpo, longpo: conservative DPO's label noise, in [0, 0.5)
    nll_weight: Optional[float] = None  # weight of the NLL (per-token mean) on the chosen answer: logo's lambda
    eval_interval: int = 0  # validation loss on data.valid_path every N steps and after the last (0: never)
    # the validation loss is also reported per sample-length bucket: samples shorter than each edge (tokens)
    eval_buckets: list[int] = field(default_factory=lambda: [8192, 32768])


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None  # None: run.output_dir/checkpoints
    interval: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGUSR1)
    keep: int = 2  # complete checkpoints kept, newest first (0: all)
    save_at_end: bool = True
    resume: bool = True  # continue from the newest complete checkpoint in `dir`, if there is one
    resume_from: Optional[str] = None  # continue from this checkpoint instead (any TP/PP/DP layout)
    init_from: Optional[str] = None  # a new run starting from these weights (e.g. an imported HF model)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    log_interval: int = 1
    tensorboard: bool = True
    wandb: str = "off"  # off | offline | online (online needs WANDB_API_KEY)
    wandb_project: str = "megalign"
    progress: bool = True
    stop_at_step: Optional[int] = None  # end this session after that step, with a checkpoint (the schedule
    #                                     still runs to training.steps: a later run resumes)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def data_paths(self) -> list[str]:
        return [self.data.path] if isinstance(self.data.path, str) else list(self.data.path)

    @property
    def valid_paths(self) -> list[str]:
        v = self.data.valid_path
        return [] if v is None else [v] if isinstance(v, str) else list(v)


def _one_line(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    message = str(e).splitlines()[0]
    return f"config key {key}: {message}" if key else f"config: {message}"


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Defaults <- model preset <- YAML file <- `key.sub=value` overrides; types checked by OmegaConf."""
    try:
        layers = [OmegaConf.load(path)] if path else []
    except FileNotFoundError:
        raise OptionError("config", f"{path}: no such file") from None
    except Exception as e:  # YAML syntax errors
        raise OptionError("config", f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise MegalignError(f"override {bad[0]!r} is not key=value (e.g. training.lr=1e-5)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.merge(*layers) if layers else OmegaConf.create()
        preset_name = OmegaConf.select(raw, "model.preset")
        base = OmegaConf.structured(Config)
        if preset_name:
            from megalign.model.presets import preset

            base = OmegaConf.merge(base, {"model": preset(preset_name)})
        merged = OmegaConf.merge(base, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise MegalignError(_one_line(e)) from None
    for key in ("path", "valid_path"):
        value = getattr(cfg.data, key)
        if isinstance(value, (ListConfig, DictConfig)):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{key: OmegaConf.to_container(value)}))
    return cfg


def resolve(cfg: Config, tokenizer_vocab_size: int | None = None) -> Config:
    """The config a run uses, with every value it derives filled in once: the vocabulary (the datasets'
    tokenizer's, when model.vocab_size is unset), the query groups and the head dimension. Configs are frozen:
    nothing changes them afterwards."""
    m = cfg.model
    vocab = m.vocab_size if m.vocab_size is not None else tokenizer_vocab_size
    if vocab is None:
        raise MegalignError("config key model.vocab_size is unset and there is no dataset to take it from")
    model = dataclasses.replace(m, vocab_size=vocab, num_query_groups=m.query_groups, kv_channels=m.head_dim)
    return dataclasses.replace(cfg, model=model)


def updated(cfg: Config, **sections: dict) -> Config:
    """A copy of `cfg` with keys of some sections changed: updated(cfg, training={"loss": "token"})."""
    changed = {name: dataclasses.replace(getattr(cfg, name), **keys) for name, keys in sections.items()}
    return dataclasses.replace(cfg, **changed)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise MegalignError(f"config key {key}: {value!r} is not one of {', '.join(choices)}")


def _divisor_hint(n: int, limit: int = 64) -> str:
    return ", ".join(str(d) for d in range(1, min(n, limit) + 1) if n % d == 0)


def _validate_rope(m: ModelConfig) -> None:
    """RoPE keys, with HF's rules for each scaling type (see megalign/model/rope.py for the types)."""
    _check_choice("model.rope_scaling", m.rope_scaling, ROPE_SCALING)
    if not 0 < m.rotary_percent <= 1:
        raise MegalignError(f"config key model.rotary_percent={m.rotary_percent} must be in (0, 1] (GLM: 0.5)")
    if m.kv_channels or m.hidden_size % m.num_attention_heads == 0:  # otherwise reported with the head size
        dim = int(m.head_dim * m.rotary_percent)
        if dim < 2 or dim % 2:
            raise MegalignError(f"config key model.rotary_percent={m.rotary_percent} gives an odd or empty rotary "
                                f"dimension {dim}: head dimension * rotary_percent must be even")
        if m.rope_scaling == "ntk" and dim <= 2:
            raise MegalignError("config key model.rope_scaling=ntk needs a rotary dimension > 2")
    if m.rope_scaling == "none":
        return
    key = f"for model.rope_scaling={m.rope_scaling}"
    if m.rope_scaling_factor < 1:
        raise MegalignError(f"config key model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 {key}")
    original = m.rope_original_max_position_embeddings
    if original is not None and original < 1:
        raise MegalignError(f"config key model.rope_original_max_position_embeddings={original} must be >= 1, "
                            "or unset (max_position_embeddings)")
    if m.rope_scaling == "llama3" and m.rope_low_freq_factor >= m.rope_high_freq_factor:
        raise MegalignError(f"config key model.rope_low_freq_factor={m.rope_low_freq_factor} must be smaller than "
                            f"model.rope_high_freq_factor={m.rope_high_freq_factor} {key} (Llama 3.1: 1 and 4)")
    if m.rope_scaling == "yarn" and m.rope_beta_fast < m.rope_beta_slow:
        raise MegalignError(f"config key model.rope_beta_fast={m.rope_beta_fast} must be >= model.rope_beta_slow="
                            f"{m.rope_beta_slow} {key} (YaRN: 32 and 1)")
    if m.rope_scaling == "yarn" and m.rope_attention_factor is not None and m.rope_attention_factor <= 0:
        raise MegalignError(f"config key model.rope_attention_factor={m.rope_attention_factor} must be > 0, or "
                            "unset (0.1 * ln(factor) + 1)")


def checkpoint_dir(cfg: Config) -> Path:
    """Where the run's checkpoints go: checkpoint.dir, else run.output_dir/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.output_dir) / "checkpoints"


def validate(cfg: Config, world_size: int, with_data: bool = True) -> None:
    """Every rule between keys, checked before any process group starts (one line per problem, first wins).
    with_data=False: the model and parallel keys only (e.g. a checkpoint converter, which has no data)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    _check_choice("training.objective", t.objective, OBJECTIVES)
    _check_choice("training.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    _validate_optimizer(t)
    _check_choice("training.loss", t.loss, LOSS_MODES)
    _validate_preference(t)
    _check_choice("run.device", cfg.run.device, DEVICES)
    _check_choice("model.recompute", m.recompute, RECOMPUTE)
    _validate_rope(m)
    _check_choice("model.activation", m.activation, ("swiglu", "gelu"))
    _check_choice("model.normalization", m.normalization, ("RMSNorm", "LayerNorm"))
    _check_choice("run.wandb", cfg.run.wandb, ("off", "offline", "online"))
    _check_choice("data.verify", cfg.data.verify, ("sizes", "full"))
    _validate_positions(cfg.data, m)
    if cfg.run.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise MegalignError(f"config key run.wandb={cfg.run.wandb} needs the wandb package "
                            "(pip install 'megalign[wandb]'), or set run.wandb=off")
    _check_choice("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp),
                       ("training.global_batch", t.global_batch), ("training.steps", t.steps)):
        if value < 1:
            raise MegalignError(f"config key {key}: must be >= 1, got {value}")
    if not (math.isfinite(p.timeout_minutes) and p.timeout_minutes > 0):
        raise MegalignError(f"config key parallel.timeout_minutes={p.timeout_minutes} must be > 0, e.g. 30")
    model_parallel = p.tp * p.pp * p.cp
    if p.sequence_parallel and p.tp == 1:
        raise MegalignError("config key parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the "
                            "sequence over the TP ranks); leave it unset to have it on exactly when tp > 1")
    if world_size % model_parallel:
        raise MegalignError(
            f"config keys parallel.tp*pp*cp = {model_parallel} must divide the world size {world_size}; "
            f"with {world_size} processes, tp*pp*cp can be one of {_divisor_hint(world_size)}"
        )
    dp = world_size // model_parallel
    if m.num_attention_heads % p.tp:
        raise MegalignError(f"config key parallel.tp={p.tp} must divide model.num_attention_heads="
                            f"{m.num_attention_heads}; try tp in {_divisor_hint(m.num_attention_heads)}")
    groups = m.query_groups
    if m.num_attention_heads % groups:
        raise MegalignError(f"config key model.num_query_groups={groups} must divide model.num_attention_heads="
                            f"{m.num_attention_heads}")
    if groups % p.tp:
        raise MegalignError(f"config key parallel.tp={p.tp} must divide model.num_query_groups={groups}; "
                            f"try tp in {_divisor_hint(groups)}")
    if m.num_layers % p.pp:
        raise MegalignError(f"config key parallel.pp={p.pp} must divide model.num_layers={m.num_layers}; "
                            f"try pp in {_divisor_hint(m.num_layers)}")
    if m.make_vocab_size_divisible_by % p.tp:
        raise MegalignError(f"config key model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} "
                            f"must be a multiple of parallel.tp={p.tp} (e.g. {128 * p.tp})")
    if (m.kv_channels is None) and m.hidden_size % m.num_attention_heads:
        raise MegalignError(f"config key model.hidden_size={m.hidden_size} is not divisible by "
                            f"model.num_attention_heads={m.num_attention_heads}; set model.kv_channels")
    if t.global_batch % dp:
        raise MegalignError(f"config key training.global_batch={t.global_batch} must be a multiple of the data-parallel "
                            f"size {dp}; try training.global_batch={max(dp, t.global_batch // dp * dp)}")
    _validate_evaluation(cfg)
    if with_data:
        _validate_data(cfg)
        _validate_checkpoint(cfg.checkpoint)
        validate_writable("run.output_dir", cfg.run.output_dir)
        if cfg.checkpoint.dir is not None:
            validate_writable("checkpoint.dir", cfg.checkpoint.dir)


def _validate_evaluation(cfg: Config) -> None:
    t = cfg.training
    if t.eval_interval < 0:
        raise MegalignError(f"config key training.eval_interval={t.eval_interval} must be >= 0 (0: no validation)")
    if t.eval_interval and not cfg.valid_paths:
        raise MegalignError(f"config key training.eval_interval={t.eval_interval} needs data.valid_path (a held-out "
                            "PREFIX made by tools/preprocess_data.py), or set training.eval_interval=0")
    edges = list(t.eval_buckets)
    if any(e < 1 for e in edges) or edges != sorted(set(edges)):
        raise MegalignError(f"config key training.eval_buckets={edges} must be increasing token counts >= 1, "
                            "e.g. [8192, 32768]")


def _validate_optimizer(t: TrainingConfig) -> None:
    """Numbers the optimizer and the schedule take: finite and in range (lr=nan or -1 would be a torch traceback
    at the first step, or train on silently)."""
    ranges = {"lr": (0, math.inf, "e.g. 2e-5"), "min_lr": (0, t.lr, f"at most training.lr={t.lr}"),
              "weight_decay": (0, math.inf, "e.g. 0.0 or 0.1"), "adam_eps": (0, 1, "e.g. 1e-8"),
              "clip_grad": (0, math.inf, "e.g. 1.0; 0 turns clipping off"),
              "warmup_fraction": (0, 1, "a fraction of training.steps, e.g. 0.03"),
              "adam_beta1": (0, 1, "e.g. 0.9"), "adam_beta2": (0, 1, "e.g. 0.95")}
    for key, (low, high, hint) in ranges.items():
        value = getattr(t, key)
        if not (math.isfinite(value) and low <= value <= high) or (key.startswith("adam_beta") and value == 1):
            raise MegalignError(f"config key training.{key}={value} is out of range [{low}, {high}]: {hint}")


def _validate_positions(d: DataConfig, m: ModelConfig) -> None:
    _check_choice("data.positions", d.positions, POSITIONS)
    _check_choice("data.balance", d.balance, BALANCE_MODES)
    w = d.skipalign_window
    if w is not None and not 0 < w <= m.max_position_embeddings:
        raise MegalignError(f"config key data.skipalign_window={w} must be in [1, model.max_position_embeddings="
                            f"{m.max_position_embeddings}] (or unset: model.max_position_embeddings); for a longer "
                            "window raise model.max_position_embeddings (with model.rotary_base or model.rope_scaling)")
    _check_choice("data.prompt", d.prompt, PROMPT_MODES)
    w = d.logo_window
    if w is not None and not 0 < w <= m.max_position_embeddings:
        raise MegalignError(f"config key data.logo_window={w} must be in [1, model.max_position_embeddings="
                            f"{m.max_position_embeddings}] (or unset: model.max_position_embeddings)")
    if d.logo_chunk < 1:
        raise MegalignError(f"config key data.logo_chunk={d.logo_chunk} must be >= 1 (tokens per chunk, e.g. 512)")
    if not 0 <= d.skipalign_fraction <= 1:
        raise MegalignError(f"config key data.skipalign_fraction={d.skipalign_fraction} must be in [0, 1] "
                            "(the share of samples that get skips)")


def _validate_preference(t: TrainingConfig) -> None:
    for key, value, ok, hint in (
            ("beta", t.beta, lambda v: v > 0, "> 0, e.g. 0.1 (dpo) or 10 (logo)"),
            ("gamma", t.gamma, lambda v: True, "finite, e.g. 0.5"),
            ("label_smoothing", t.label_smoothing, lambda v: 0 <= v < 0.5, "in [0, 0.5), e.g. 0"),
            ("nll_weight", t.nll_weight, lambda v: v >= 0, ">= 0, e.g. 0.1")):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise MegalignError(f"config key training.{key}={value} must be {hint}")
    if t.label_smoothing and t.objective not in ("dpo", "longpo"):
        raise MegalignError(f"config key training.label_smoothing={t.label_smoothing} applies to dpo and longpo, "
                            f"not training.objective={t.objective}: set it to 0")


def validate_writable(key: str, path: str) -> None:
    """The run can create `path` and write in it: a probe file in its nearest existing directory, removed at once
    (permission bits alone do not tell: root ignores them, a read-only mount does not)."""
    import tempfile
    from pathlib import Path

    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MegalignError(f"config key {key}={path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise MegalignError(f"config key {key}={path}: cannot write in {existing} ({e.strerror or e}); choose a "
                            "directory this user can write") from None


def _validate_checkpoint(c: CheckpointConfig) -> None:
    for key, value in (("checkpoint.interval", c.interval), ("checkpoint.keep", c.keep)):
        if value < 0:
            raise MegalignError(f"config key {key}: must be >= 0, got {value}")
    for key, value in (("checkpoint.resume_from", c.resume_from), ("checkpoint.init_from", c.init_from)):
        if value is not None and not os.path.isdir(value):
            raise MegalignError(f"config key {key}: {value} is not a directory (a checkpoint written by megalign "
                                "or tools/convert_checkpoint.py)")
    if c.resume_from is not None and c.init_from is not None:
        raise MegalignError("config keys checkpoint.resume_from and checkpoint.init_from exclude each other: "
                            "resume_from continues a run, init_from starts a new one from weights")


def _validate_data(cfg: Config) -> None:
    if cfg.data.path is None:
        raise MegalignError("config key data.path is missing: give a PREFIX written by tools/preprocess_data.py")
    paths = cfg.data_paths
    if not paths or not all(isinstance(x, str) for x in paths):
        raise MegalignError(f"config key data.path: expected a PREFIX or a list of PREFIXes, got {cfg.data.path!r}")
    for prefix in paths:
        if not os.path.isfile(prefix + ".json"):
            raise MegalignError(f"config key data.path: {prefix}.json not found (a PREFIX written by "
                                "tools/preprocess_data.py, without .bin/.idx)")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(paths):
        raise MegalignError(f"config key data.weights: {len(cfg.data.weights)} weights for {len(paths)} paths")
    if cfg.data.weights is not None and (min(cfg.data.weights) < 0 or sum(cfg.data.weights) <= 0):
        raise MegalignError("config key data.weights: weights must be >= 0 with a positive sum")
    from megalign.data.packed_dataset import read_metadata

    valid = cfg.valid_paths
    if not all(isinstance(x, str) for x in valid):
        raise MegalignError(f"config key data.valid_path: expected a PREFIX or a list of PREFIXes, "
                            f"got {cfg.data.valid_path!r}")
    for prefix in valid:
        if not os.path.isfile(prefix + ".json"):
            raise MegalignError(f"config key data.valid_path: {prefix}.json not found (a PREFIX written by "
                                "tools/preprocess_data.py, without .bin/.idx)")
    metas = [read_metadata(p) for p in paths]  # one-line errors for damaged metadata
    vocab = {m["tokenizer"]["sha256"] for m in metas}
    if len(vocab) > 1:
        raise MegalignError("config key data.path: the datasets were made with different tokenizers")
    for prefix in valid:
        if read_metadata(prefix)["tokenizer"]["sha256"] not in vocab:
            raise MegalignError(f"config key data.valid_path: {prefix} was made with another tokenizer than "
                                "data.path: its loss would not be comparable (preprocess it with the same one)")
    metas += [read_metadata(p) for p in valid]
    longest = max(m["seq_length"] for m in metas)
    if longest > cfg.model.max_position_embeddings:
        raise MegalignError(
            f"config key model.max_position_embeddings={cfg.model.max_position_embeddings} is shorter than the "
            f"packs of data.path ({longest} tokens): set model.max_position_embeddings={longest} (with a larger "
            "model.rotary_base or model.rope_scaling to extend a model's context)")
    need = max(m["tokenizer"]["vocab_size"] for m in metas)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < need:
        raise MegalignError(f"config key model.vocab_size={cfg.model.vocab_size} is smaller than the dataset "
                            f"tokenizer's {need}; leave it unset to use the tokenizer's")
