"""Every workaround for megatron-core 0.16, in one place. Moving to a newer megatron-core is this list, top to
bottom: each entry has a canary in tests/test_megatron_compat.py that fails when upstream changes the behaviour
the workaround relies on (or fixes the bug it works around), saying which entry to revisit.

Patches that live here:
  1. quiet_known_warnings         notices about optional packages and deprecations inside megatron-core
  2. prepare_optimizer_for_loading / load_optimizer_state
                                  the distributed optimizer's fully_reshardable load without TE/Apex: Adam state
                                  must exist before loading; the loader raises KeyError 'step'; after a load every
                                  parameter shares one `step` tensor (Adam's bias correction silently wrong)
  3. SCHEDULER_FOLLOWS_CONFIG     OptimizerParamScheduler keeps the checkpoint's lr/steps unless both flags are set
                                  (override alone asserts)
  4. set_rope_attention_scaling   YaRN's attention scaling through the three MLA-only fields megatron's Attention
                                  reads for every RoPE model (`_yarn_get_concentration_factor_from_config`)
  5. CHECKPOINT_LOAD_ERRORS       torch.distributed.checkpoint's CheckpointException is a BaseException
 12. results_queue_that_dies_with_the_trainer
                                  dist_checkpointing's writer keeps a spawn-context Manager process (its results
                                  queue) for the life of the trainer; killed with SIGKILL, the trainer leaves it
                                  (and its resource tracker) orphaned: megalign starts that Manager itself, with a
                                  parent-death signal

Workarounds that live with the code they serve (pointers):
  6. model/rope.py GPTModelWithPositions._preprocess   overrides GPTModel's private `_preprocess` and relies on
                                  megatron's THD RoPE taking a row-long embedding as one angle per token ("exact
                                  mapping") and restarting per sequence only when max_seqlen is the longest sample;
                                  model/gpt.py overrides `compute_language_model_loss` (padded vocabulary masked)
  7. model/attention.py           a core attention of our own: the local spec's DotProductAttention refuses packed
                                  (THD) batches and context parallelism
  8. model/build.py               variable_seq_lengths needs moe_token_dispatcher_type="alltoall" even without MoE;
                                  perform_initialization=False leaves the tensor-parallel attributes unset (so
                                  megatron initialises, then model/init.py redraws)
  9. model/init.py _draw          TE's spec names the fused norm `layer_norm_weight` (initialised to ones)
 10. training/loss.py weighted_loss   megatron's schedule divides the returned loss in place: report a copy
 11. parallel/cpu.py              the CPU mode: the CUDA calls megatron-core hard-codes, emulated
"""

from __future__ import annotations

import math
import warnings

import torch

# -- 1. warnings -----------------------------------------------------------------------------------------------
# (message regex, where it comes from): notices about optional packages megalign chose not to need, and
# deprecations inside megatron-core and torch that megalign cannot act on.
KNOWN_WARNINGS = (
    ("Transformer Engine and Apex are not installed", "megatron.core"),
    ("Apex is not installed", "megatron.core"),
    ("full scope is deprecated", "megatron.core"),
    (".*is deprecated. Please use", "megatron.core"),
    ("When using async grad allreduce", "megatron.core"),
    ("The .grad attribute of a Tensor that is not a leaf", "torch"),
    ("`load_state_dict` is deprecated", "torch"),
    ("Please use DTensor instead", "torch"),
)


def quiet_known_warnings() -> None:
    for message, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


# -- 2. the distributed optimizer's checkpoint load (no TE/Apex: torch Adam) -----------------------------------
def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prepare_optimizer_for_loading(optimizer) -> None:
    """A fresh optimizer has no Adam state yet; megatron's loader needs it allocated, `step` included (megatron
    allocates only the moments; without TE/Apex its state_dict reads a per-parameter `step`)."""
    for opt in _optimizers(optimizer):
        if not opt.optimizer.state:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def load_optimizer_state(optimizer, loaded) -> None:
    """Load the optimizer state in two parts, around a bug of megatron-core 0.16 without TE/Apex (plain torch
    Adam): its fully reshardable loader copies every per-parameter state key, `step` included, from a source
    that never has `step` (KeyError). So: groups and step first, then the tensors with `step` set aside.

    Megatron also restores one `step` tensor shared by all parameters, which each Adam update would then advance
    once per parameter (a silently wrong bias correction): each parameter gets its own copy."""
    from megalign.errors import MegalignError

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


# -- 3. the LR schedule of a resumed run follows its config ----------------------------------------------------
SCHEDULER_FOLLOWS_CONFIG = {"override_opt_param_scheduler": True, "use_checkpoint_opt_param_scheduler": False}


# -- 4. RoPE attention scaling (YaRN) ----------------------------------------------------------------------------
def set_rope_attention_scaling(config, scaling: float) -> None:
    """Make megatron's attention multiply cos and sin by `scaling`, as HF does (only the rotated dimensions).

    megatron's Attention (transformer/attention.py, both apply_rotary_pos_emb calls) passes
    mscale=_yarn_get_concentration_factor_from_config(config) into the rotation, which multiplies cos and sin;
    that function reads three YaRN fields that only MLA's config declares, and returns
    get_mscale(f, mscale) / get_mscale(f, mscale_all_dim) with get_mscale(f, m) = 0.1 * m * ln(f) + 1.
    With f = e and mscale_all_dim = 0 that is 0.1 * mscale + 1: any scaling can be written in it. Nothing
    else in megatron-core reads these fields for a 'rope' GPTModel. A scaling of 1 sets nothing.
    """
    if scaling == 1.0:
        return
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    config.yarn_rotary_scaling_factor = math.e
    config.yarn_mscale = (scaling - 1.0) / 0.1
    config.yarn_mscale_all_dim = 0.0
    got = _yarn_get_concentration_factor_from_config(config)
    if not math.isclose(got, scaling, rel_tol=1e-12):
        raise AssertionError(f"megatron reads attention scaling {got}, expected {scaling}")


# -- 5. errors of a checkpoint load ------------------------------------------------------------------------------
def _checkpoint_load_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    return (CheckpointException,)


CHECKPOINT_LOAD_ERRORS = _checkpoint_load_errors()


# -- 12. dist_checkpointing's results-queue Manager dies with the trainer ---------------------------------------
def _die_with_parent() -> None:
    """In a child process: the kernel sends it SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not glibc Linux: the Manager outlives a killed trainer, as upstream's does
        pass


def results_queue_that_dies_with_the_trainer():
    """Give megatron's FileSystemWriterAsync its results queue from a Manager started here, whose server process
    dies with this process (megatron starts a plain one on the first save: filesystem_async.py
    `_get_write_results_queue`). Idempotent; returns the Manager (or None if megatron already made its own).

    Forked, not spawned as megatron's is: a spawned server imports torch to unpickle the first write results,
    which made every process's first save take 3-9 s longer (measured: 9 s -> 1.5 s for 4 ranks on 2 CPUs).
    The server only passes lists of write results; megatron forks its writer processes from the trainer too."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _results_manager
    if filesystem_async._results_queue is not None:
        return _results_manager
    manager = SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = manager.Queue()
    _results_manager = manager
    return manager


_results_manager = None
