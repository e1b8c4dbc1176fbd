"""Checkpoints: megatron dist_checkpointing state (state.py), published atomically on disk (store.py),
saved on preemption signals (preemption.py).

The names below are loaded on first use, so reading the on-disk layout (store.py, e.g. from the Slurm batch
scripts' bookkeeping) does not import torch and megatron-core."""

_STATE = ("Restored", "RunIdentity", "TrainingParts", "data_identity", "load_training", "load_weights",
          "model_identity", "resolve", "rng_state", "save_training", "save_weights", "set_rng_state",
          "training_manifest")
_STORE = ("CheckpointStore", "read_manifest")
__all__ = sorted(_STATE + _STORE)


def __getattr__(name: str):
    if name in _STATE:
        from megalign.checkpoint import state

        return getattr(state, name)
    if name in _STORE:
        from megalign.checkpoint import store

        return getattr(store, name)
    raise AttributeError(f"module 'megalign.checkpoint' has no attribute {name!r}")
