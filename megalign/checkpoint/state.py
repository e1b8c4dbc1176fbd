"""What a checkpoint holds and how it goes in and out of megatron's `dist_checkpointing`.

Two kinds, one on-disk form (see store.py):
- "weights": the model only (what `tools/convert_checkpoint.py` writes; `checkpoint.init_from` starts a new
  run from it).
- "training": model, optimizer (the distributed optimizer's state in its fully reshardable form), LR schedule,
  sampler position, step, and each rank's RNG streams: everything a run needs to continue as if never stopped.

Model and optimizer tensors are megatron ShardedTensors, so a checkpoint written at one TP/PP/DP layout loads
at another. RNG streams belong to ranks and are restored only at the layout they were saved at.

Every check that can fail (manifest, file sizes, model shape, data) runs on rank 0 before megatron reads
anything, and its verdict is broadcast, so a bad checkpoint is one clear error on every rank, not a hang.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megalign.checkpoint.store import CheckpointStore, read_manifest, step_dir_name
from megalign.config import to_dict
from megalign.errors import MegalignError

log = logging.getLogger("megalign")

# The model keys that decide tensor shapes: a checkpoint loads only into a model that agrees on all of them.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "padded_vocab_size", "normalization", "activation", "add_qkv_bias", "add_bias_linear",
              "tie_embeddings")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


# -- identities written into the manifest and checked on load ------------------------------------------
def model_identity(model_cfg, padded_vocab_size: int) -> dict:
    """The model section of the config, plus the padded vocabulary, as plain values."""
    from dataclasses import asdict

    identity = {k: v for k, v in asdict(model_cfg).items() if k not in ("preset",)}
    identity["padded_vocab_size"] = padded_vocab_size
    identity["num_query_groups"] = model_cfg.num_query_groups or model_cfg.num_attention_heads
    identity["kv_channels"] = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    return identity


def shape_mismatches(saved: dict, current: dict) -> list[str]:
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
            for k in SHAPE_KEYS if saved.get(k) != current.get(k)]


def data_identity(datasets) -> list[dict]:
    """Each training dataset by its path and the sha256 of its files (computed once, at preprocessing)."""
    return [{"path": ds.prefix, "sha256": {s: f["sha256"] for s, f in sorted(ds.meta["files"].items())}}
            for ds in datasets]


# -- running a check on rank 0 and raising everywhere --------------------------------------------------
def agree(check) -> object:
    """Run `check()` on rank 0 and give every rank its result, or raise its MegalignError on every rank."""
    outcome = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", check())
        except MegalignError as e:
            outcome[0] = ("error", str(e))
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise MegalignError(value)
    return value


# -- saving (both kinds) and model weights ------------------------------------------------------------
def _save(state: dict, store: CheckpointStore, step: int, manifest: dict, keep: int | None) -> Path:
    from megatron.core import dist_checkpointing

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        store.begin(step)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(state, str(store.partial_dir(step)))
    if dist.is_initialized():
        dist.barrier()  # every rank has written its shards
    final = store.root / step_dir_name(step)
    if rank0:
        final = store.publish(step, manifest, keep)
    if dist.is_initialized():
        dist.barrier()  # nobody reads `latest` before it is written
    return final


def _read(path: Path, state: dict) -> dict:
    """megatron's load, with its failures (a damaged file that kept its size) named as the checkpoint's. The
    rank that fails exits; its launcher (torchrun, srun) stops the others."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        return dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as e:
        summary = (str(e).strip().splitlines() or [""])[-1][:200]
        raise MegalignError(f"checkpoint {path} cannot be read ({type(e).__name__}: {summary}); it may be "
                            "damaged: resume from an older one with checkpoint.resume_from=DIR") from e


def save_weights(model, root: str | Path, model_cfg, padded_vocab_size: int, step: int = 0,
                 source: dict | None = None) -> Path:
    """The model alone (a megatron GPTModel, unwrapped) as a "weights" checkpoint under `root`."""
    manifest = {"kind": "weights", "step": step, "model": model_identity(model_cfg, padded_vocab_size),
                "source": source or {}}
    return _save({"model": model.sharded_state_dict()}, CheckpointStore(root), step, manifest, keep=None)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a root holding checkpoints (then its newest complete one)."""
    path = Path(path)
    if path.is_dir() and not (path / "megalign.json").exists():
        newest = CheckpointStore(path).latest()
        if newest is not None:
            return newest
    return path


def check_model(path: Path, model_cfg, padded_vocab_size: int) -> dict:
    manifest = read_manifest(path)
    problems = shape_mismatches(manifest["model"], model_identity(model_cfg, padded_vocab_size))
    if problems:
        raise MegalignError(f"checkpoint {path} holds a model of another shape: " + "; ".join(problems) +
                            " (set those keys as the checkpoint has them, e.g. with an import's model.yaml, or start "
                            "over in a new run.output_dir)")
    return manifest


def load_weights(model, path: str | Path, model_cfg, padded_vocab_size: int) -> dict:
    """Load the model weights of any checkpoint (weights or training) into `model` at this run's layout."""
    path = resolve(path)
    manifest = agree(lambda: check_model(path, model_cfg, padded_vocab_size))
    loaded = _read(path, {"model": model.sharded_state_dict()})
    model.load_state_dict(loaded["model"])
    return manifest


# -- RNG streams ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(layout, data) -> object:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (layout.pp, layout.tp, layout.cp, layout.dp)
    offset = (layout.pp_rank, layout.tp_rank, layout.cp_rank, layout.dp_rank)
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def layout_identity(layout) -> dict:
    return {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp}


# -- the whole training state --------------------------------------------------------------------------
def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prepare_optimizer_for_loading(optimizer) -> None:
    """A fresh optimizer has no Adam state yet; megatron's loader needs it allocated, `step` included (megatron
    allocates only the moments; without TE/Apex its state_dict reads a per-parameter `step`)."""
    for opt in _optimizers(optimizer):
        if not opt.optimizer.state:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _load_optimizer(optimizer, loaded) -> None:
    """Load the optimizer state in two parts, around a bug of megatron-core 0.16 without TE/Apex (plain torch
    Adam): its fully reshardable loader copies every per-parameter state key, `step` included, from a source
    that never has `step` (KeyError). So: groups and step first, then the tensors with `step` set aside.

    Megatron also restores one `step` tensor shared by all parameters, which each Adam update would then advance
    once per parameter (a silently wrong bias correction): each parameter gets its own copy."""
    chained = _optimizers(optimizer)
    parts = [loaded] if len(chained) == 1 else [loaded[i] for i in range(len(chained))]
    for opt, part in zip(chained, parts):
        part = dict(part)
        param_state = part.pop("param_state", None)
        sharding = part.pop("param_state_sharding_type", None)
        opt.load_state_dict(part)
        if param_state is None:
            continue
        if sharding != "fully_reshardable":
            raise MegalignError(f"optimizer state of sharding type {sharding!r}; megalign writes fully_reshardable")
        steps = {p: state.pop("step") for p, state in opt.optimizer.state.items() if "step" in state}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step.clone()


def training_state(trainer, is_loading: bool, with_rng: bool = True) -> dict:
    model = trainer.model.module
    model_state = model.sharded_state_dict()
    if is_loading:
        _prepare_optimizer_for_loading(trainer.optimizer)
    state = {
        "model": model_state,
        "optimizer": trainer.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA),
        "scheduler": trainer.scheduler.state_dict(),
        "sampler": trainer.sampler.state_dict(),
        "step": trainer.step,
    }
    if with_rng:
        state["rng"] = _rng_sharded(trainer.layout, rng_state())
    return state


def save_training(trainer, store: CheckpointStore, keep: int | None) -> Path:
    manifest = {
        "kind": "training", "step": trainer.step,
        "model": model_identity(trainer.cfg.model, trainer.padded_vocab),
        "data": data_identity(trainer.datasets), "layout": layout_identity(trainer.layout),
        "sampler": trainer.sampler.state_dict(), "seed": trainer.cfg.training.seed,
        "source": trainer.source,  # where the weights first came from (an HF import: its architecture, ids)
        "config": to_dict(trainer.cfg),  # the run's whole config, for the record (resume uses the new one)
    }
    return _save(training_state(trainer, is_loading=False), store, trainer.step, manifest, keep)


def check_training(path: Path, trainer) -> dict:
    manifest = check_model(path, trainer.cfg.model, trainer.padded_vocab)
    if manifest["kind"] != "training":
        raise MegalignError(f"checkpoint {path} holds weights only (kind {manifest['kind']!r}), not a run to "
                            f"resume: start from it with checkpoint.init_from={path}")
    saved, current = manifest["data"], data_identity(trainer.datasets)
    if [d["sha256"] for d in saved] != [d["sha256"] for d in current]:
        raise MegalignError(
            f"checkpoint {path} was trained on other data ({', '.join(d['path'] for d in saved)}) than "
            f"data.path ({', '.join(d['path'] for d in current)}): the sampler position would be meaningless. "
            f"To train on new data from these weights, use a new run.output_dir with checkpoint.init_from={path}")
    if manifest["seed"] != trainer.cfg.training.seed:
        raise MegalignError(f"checkpoint {path} was trained with training.seed={manifest['seed']}, the config "
                            f"says {trainer.cfg.training.seed}; set training.seed={manifest['seed']} to resume")
    return manifest


def load_training(trainer, path: str | Path) -> dict:
    """Restore everything `save_training` wrote into a freshly built trainer (any TP/PP/DP layout)."""
    path = Path(path)
    manifest = agree(lambda: check_training(path, trainer))
    same_layout = manifest["layout"] == layout_identity(trainer.layout)
    state = training_state(trainer, is_loading=True, with_rng=same_layout)
    loaded = _read(path, state)
    trainer.model.module.load_state_dict(loaded["model"])
    _load_optimizer(trainer.optimizer, loaded["optimizer"])
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    trainer.sampler.load_state_dict(loaded["sampler"])
    trainer.step = int(loaded["step"])
    if same_layout:
        set_rng_state(loaded["rng"])
    else:
        log.info(f"checkpoint layout {manifest['layout']} differs from this run's "
                 f"{layout_identity(trainer.layout)}: RNG streams start fresh from training.seed")
    return manifest
