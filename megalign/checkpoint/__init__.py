"""Checkpoints: megatron dist_checkpointing state (state.py), published atomically on disk (store.py),
saved on preemption signals (preemption.py)."""

from megalign.checkpoint.state import (Restored, RunIdentity, TrainingParts, load_training, load_weights, resolve,
                                       rng_state, save_training, save_weights, set_rng_state, training_manifest)
from megalign.checkpoint.store import CheckpointStore, read_manifest

__all__ = ["CheckpointStore", "Restored", "RunIdentity", "TrainingParts", "load_training", "load_weights",
           "read_manifest", "resolve", "rng_state", "save_training", "save_weights", "set_rng_state",
           "training_manifest"]
