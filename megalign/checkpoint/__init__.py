"""Checkpoints: megatron dist_checkpointing state (state.py), published atomically on disk (store.py),
saved on preemption signals (preemption.py)."""

from megalign.checkpoint.state import load_training, load_weights, resolve, save_training, save_weights
from megalign.checkpoint.store import CheckpointStore, read_manifest

__all__ = ["CheckpointStore", "load_training", "load_weights", "read_manifest", "resolve", "save_training",
           "save_weights"]
