"""Checkpoints: megatron dist_checkpointing state (state.py), published atomically on disk (store.py),
saved on preemption signals (preemption.py)."""

from megalign.checkpoint.state import (Restored, RunIdentity, TrainingParts, data_identity, load_training, load_weights,
                                       model_identity, resolve, rng_state, save_training, save_weights, set_rng_state,
                                       training_manifest)
from megalign.checkpoint.store import CheckpointStore, read_manifest

__all__ = ["CheckpointStore", "Restored", "RunIdentity", "TrainingParts", "data_identity", "load_training",
           "load_weights", "model_identity",
           "read_manifest", "resolve", "rng_state", "save_training", "save_weights", "set_rng_state",
           "training_manifest"]
