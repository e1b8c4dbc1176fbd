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

This layer takes explicit parts (`TrainingParts`, `RunIdentity`) and returns what it restored (`Restored`); it
never sees the trainer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalign import megatron_compat
from megalign.checkpoint.store import (CheckpointStore, checksum, damaged_files, file_sizes, read_manifest, share_of,
                                       step_dir_name)
from megalign.errors import MegalignError, StorageError

log = logging.getLogger("megalign")

# The model keys that decide tensor shapes: a checkpoint loads only into a model that agrees on all of them.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "padded_vocab_size", "normalization", "activation", "add_qkv_bias", "add_bias_linear",
              "tie_embeddings")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


# -- identities written into the manifest and checked on load ------------------------------------------
def model_identity(model_cfg) -> dict:
    """The model section of the config with its derived values (padded vocabulary, groups, head dim)."""
    identity = {k: v for k, v in asdict(model_cfg).items() if k not in ("preset",)}
    identity["padded_vocab_size"] = model_cfg.padded_vocab_size
    identity["num_query_groups"] = model_cfg.query_groups
    identity["kv_channels"] = model_cfg.head_dim
    return identity


def shape_mismatches(saved: dict, current: dict) -> list[str]:
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
            for k in SHAPE_KEYS if saved.get(k) != current.get(k)]


def data_identity(datasets) -> list[dict]:
    """Each training dataset's fingerprint (data/source.py): its path and the sha256 of its content."""
    return [ds.fingerprint() for ds in datasets]


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must agree with to be resumed by a run: the model (model_identity), the data
    (data_identity) and the seed."""

    model: dict
    data: list
    seed: int


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
    partial = store.partial_dir(step)
    megatron_compat.results_queue_that_dies_with_the_trainer()  # no orphaned writer process after a SIGKILL
    try:
        dist_checkpointing.save(state, str(partial))
    except (Exception, *megatron_compat.CHECKPOINT_LOAD_ERRORS) as e:  # raised on every rank (megatron gathers)
        raise _save_failure(store, step, partial, e, rank0) from e
    if dist.is_initialized():
        dist.barrier()  # every rank has written its shards
    # every rank hashes its share of the files, in parallel
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {name: checksum(partial / name) for name in share_of(list(file_sizes(partial)), rank, world)}
    shares = [mine]
    if dist.is_initialized():
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    final = store.root / step_dir_name(step)
    if rank0:
        final = store.publish(step, manifest, keep, checksums={k: v for share in shares for k, v in share.items()})
    if dist.is_initialized():
        dist.barrier()  # nobody reads `latest` before it is written
    return final


def _save_failure(store: CheckpointStore, step: int, partial: Path, error: BaseException, rank0: bool) -> Exception:
    """A failed save as the user can act on it. The published checkpoints are untouched; the partial directory is
    removed (its space is what a full disk lacks). A full disk is named as such: megatron's writer reports it as
    a torch serialization failure, so the free space is what tells."""
    import shutil

    written = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.is_dir() else 0
    free = shutil.disk_usage(partial.parent).free
    previous = store.latest()
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
    kept = f"{previous} is still the newest checkpoint" if previous else "no earlier checkpoint exists"
    needed = sum(size for size in read_manifest(previous)["files"].values()) if previous else None
    if free < max(64 << 20, (needed or 0) // 100) or _is_no_space(error):
        need = f"about {_size(needed)} (the size of the previous one)" if needed else \
            f"more than the {_size(written)} written before it filled"
        return StorageError(f"checkpoint of step {step}: no space left on the device of {store.root} "
                            f"({_size(free)} free; a checkpoint needs {need}); {kept}. Free space or set "
                            "checkpoint.dir elsewhere, then rerun to resume")
    summary = (str(error).strip().splitlines() or [""])[-1][:200]
    return StorageError(f"checkpoint of step {step} could not be written to {store.root} ({type(error).__name__}: "
                        f"{summary}); {kept}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _is_no_space(error: BaseException) -> bool:
    import errno

    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def verify_checksums(path: Path, manifest: dict) -> None:
    """Every file of the checkpoint against the checksum recorded at save, each rank checking its share in
    parallel; a damaged file is the same one-line error on every rank. (Checkpoints written before checksums
    were recorded have none to check.)"""
    recorded = (manifest.get("checksums") or {}).get("files")
    if not recorded:
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    found = damaged_files(path, recorded, share_of(list(recorded), rank, world))
    every = [found]
    if dist.is_initialized():
        every = [None] * world
        dist.all_gather_object(every, found)
    damaged = sorted(name for names in every for name in names)
    if damaged:
        raise MegalignError(f"checkpoint {path}: {', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''} "
                            "fail their checksum (damaged after they were written); resume from an older "
                            "checkpoint with checkpoint.resume_from=DIR")


def _read(path: Path, state: dict) -> dict:
    """megatron's load, with its failures (a damaged file that kept its size) named as the checkpoint's. The
    rank that fails exits; its launcher (torchrun, srun) stops the others."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(state, str(path))
    except (Exception, *megatron_compat.CHECKPOINT_LOAD_ERRORS) as e:
        summary = (str(e).strip().splitlines() or [""])[-1][:200]
        raise MegalignError(f"checkpoint {path} cannot be read ({type(e).__name__}: {summary}); it may be "
                            "damaged: resume from an older one with checkpoint.resume_from=DIR") from e


def save_weights(model, root: str | Path, model_cfg, step: int = 0, source: dict | None = None) -> Path:
    """The model alone (a megatron GPTModel, unwrapped) as a "weights" checkpoint under `root`."""
    manifest = {"kind": "weights", "step": step, "model": model_identity(model_cfg),
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


def check_model(path: Path, identity: dict) -> dict:
    """The manifest of `path`, if its model has the shape of `identity` (model_identity)."""
    manifest = read_manifest(path)
    if not isinstance(manifest.get("model"), dict):
        raise MegalignError(f"checkpoint {path}: its manifest describes no model (key 'model'); not a checkpoint "
                            "megalign wrote, or a damaged one")
    problems = shape_mismatches(manifest["model"], identity)
    if problems:
        raise MegalignError(f"checkpoint {path} holds a model of another shape: " + "; ".join(problems) +
                            " (set those keys as the checkpoint has them, e.g. with an import's model.yaml, or start "
                            "over in a new run.output_dir)")
    return manifest


def load_weights(model, path: str | Path, model_cfg) -> dict:
    """Load the model weights of any checkpoint (weights or training) into `model` at this run's layout."""
    path = resolve(path)
    manifest = agree(lambda: check_model(path, model_identity(model_cfg)))
    verify_checksums(path, manifest)
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
@dataclass
class TrainingParts:
    """The objects a training checkpoint saves from and restores into, at this rank's place in `layout`."""

    model: Any  # this rank's megatron model, unwrapped (not the DDP wrapper)
    optimizer: Any  # megatron's optimizer
    scheduler: Any  # megatron's OptimizerParamScheduler
    layout: Any  # parallel.setup.Layout


@dataclass(frozen=True)
class Restored:
    """What a training checkpoint gave back: model, optimizer and scheduler are restored in place; the step,
    the sampler's state and the RNG streams (None when the layout differs: they restart from the seed) are the
    caller's to apply."""

    path: Path
    step: int
    sampler: dict
    rng: dict | None
    manifest: dict


def _state(parts: TrainingParts, step: int, sampler: dict, rng: dict | None, is_loading: bool) -> dict:
    model_state = parts.model.sharded_state_dict()
    if is_loading:
        megatron_compat.prepare_optimizer_for_loading(parts.optimizer)
    state = {
        "model": model_state,
        "optimizer": parts.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                        metadata=OPTIMIZER_METADATA),
        "scheduler": parts.scheduler.state_dict(),
        "sampler": sampler,
        "step": step,
    }
    if rng is not None:
        state["rng"] = _rng_sharded(parts.layout, rng)
    return state


def training_manifest(identity: RunIdentity, step: int, layout, sampler: dict, source: dict, config: dict) -> dict:
    return {
        "kind": "training", "step": step, "model": identity.model, "data": identity.data,
        "layout": layout_identity(layout), "sampler": sampler, "seed": identity.seed,
        "source": source,  # where the weights first came from (an HF import: its architecture, ids)
        "config": config,  # the run's whole config, for the record (resume uses the new one)
    }


def save_training(parts: TrainingParts, step: int, sampler: dict, rng: dict, manifest: dict,
                  store: CheckpointStore, keep: int | None) -> Path:
    """Everything a run needs to continue, published atomically as step `step` of `store` (collective)."""
    return _save(_state(parts, step, sampler, rng, is_loading=False), store, step, manifest, keep)


def check_training(path: Path, identity: RunIdentity) -> dict:
    manifest = check_model(path, identity.model)
    if manifest["kind"] != "training":
        raise MegalignError(f"checkpoint {path} holds weights only (kind {manifest['kind']!r}), not a run to "
                            f"resume: start from it with checkpoint.init_from={path}")
    saved, current = manifest["data"], identity.data
    if [d["sha256"] for d in saved] != [d["sha256"] for d in current]:
        raise MegalignError(
            f"checkpoint {path} was trained on other data ({', '.join(d['path'] for d in saved)}) than "
            f"data.path ({', '.join(d['path'] for d in current)}): the sampler position would be meaningless. "
            f"To train on new data from these weights, use a new run.output_dir with checkpoint.init_from={path}")
    if manifest["seed"] != identity.seed:
        raise MegalignError(f"checkpoint {path} was trained with training.seed={manifest['seed']}, the config "
                            f"says {identity.seed}; set training.seed={manifest['seed']} to resume")
    return manifest


def load_training(parts: TrainingParts, path: str | Path, identity: RunIdentity, sampler: dict) -> Restored:
    """Restore model, optimizer and scheduler from `path` (any TP/PP/DP layout) into `parts`; `sampler` is a
    state of the same shape as the saved one (the run's fresh sampler's). Returns the rest."""
    path = Path(path)
    manifest = agree(lambda: check_training(path, identity))
    verify_checksums(path, manifest)
    same_layout = manifest["layout"] == layout_identity(parts.layout)
    state = _state(parts, 0, sampler, rng_state() if same_layout else None, is_loading=True)
    loaded = _read(path, state)
    parts.model.load_state_dict(loaded["model"])
    megatron_compat.load_optimizer_state(parts.optimizer, loaded["optimizer"])
    parts.scheduler.load_state_dict(loaded["scheduler"])
    if not same_layout:
        log.info(f"checkpoint layout {manifest['layout']} differs from this run's "
                 f"{layout_identity(parts.layout)}: RNG streams start fresh from training.seed")
    return Restored(path=path, step=int(loaded["step"]), sampler=loaded["sampler"],
                    rng=loaded["rng"] if same_layout else None, manifest=manifest)
