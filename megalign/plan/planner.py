"""The planner: every layout of a cluster, whether it can run (the config's own rules, `validate`), whether it fits
in a GPU's memory (memory.py), and how fast it is modelled to be (step_time.py); the ones that fit, best first,
and each of the others with the one-line reason it fails."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megalign.config import RECOMPUTE, Config, updated, validate
from megalign.errors import MegalignError, OptionError
from megalign.plan.hardware import GIB, Gpu
from megalign.plan.layout import Layout, candidates
from megalign.plan.memory import BF16, MemoryEstimate, Precision, attention_kind, estimate
from megalign.plan.step_time import StepTime, step_time
from megalign.plan.workload import Workload

MEMORY_TERMS = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer", "buffers": "SP buffer",
                "activations": "activations", "kv_gather": "gathered K/V", "logits": "logits",
                "transient": "backward transients"}


@dataclass(frozen=True)
class Assessment:
    layout: Layout
    memory: MemoryEstimate | None = None  # None: excluded before its memory was estimated
    time: StepTime | None = None  # None: excluded
    reason: str | None = None  # why it is excluded; None: it fits

    @property
    def fits(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Plan:
    cfg: Config  # the resolved config the layouts vary
    workload: Workload
    gpu: Gpu
    nodes: int
    gpus_per_node: int
    global_batch: int
    usable_bytes: float
    headroom: float
    precision: Precision
    attention: str  # memory.ATTENTION_KINDS
    mfu: float
    fitting: list[Assessment]  # best first
    excluded: list[Assessment]

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def plan(cfg: Config, workload: Workload, gpu: Gpu, nodes: int, gpus_per_node: int = 8,
         global_batch: int | None = None, recompute: tuple[str, ...] = RECOMPUTE, mfu: float = 0.4,
         headroom: float = 0.1, precision: Precision = BF16) -> Plan:
    """Every layout of nodes x gpus_per_node GPUs for the resolved config `cfg` (model.vocab_size set)."""
    _check_options(nodes, gpus_per_node, global_batch, recompute, mfu, headroom)
    if workload.seq_length > cfg.model.max_position_embeddings:
        raise MegalignError(
            f"packs of {workload.seq_length:,} tokens are longer than model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}: set model.max_position_embeddings={workload.seq_length} (with "
            "model.rotary_base or model.rope_scaling to extend the model's context)")
    if global_batch is not None:
        cfg = updated(cfg, training={"global_batch": global_batch})
    validate(updated(cfg, parallel={"tp": 1, "pp": 1, "cp": 1, "sequence_parallel": None}), 1, with_data=False)
    world = nodes * gpus_per_node
    usable = gpu.memory_bytes * (1 - headroom)
    kind = attention_kind(cfg.model.attention_backend)
    assessed = [_assess(cfg, layout, workload, gpu, gpus_per_node, usable, precision, kind, mfu)
                for layout in candidates(world, cfg.parallel.sequence_parallel, cfg.parallel.distributed_optimizer,
                                         tuple(recompute))]
    fitting = sorted((a for a in assessed if a.fits), key=lambda a: (a.time.total, a.memory.total))
    excluded = sorted((a for a in assessed if not a.fits),
                      key=lambda a: (a.memory is None, a.memory.total if a.memory else 0.0))
    return Plan(cfg=cfg, workload=workload, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node,
                global_batch=cfg.training.global_batch, usable_bytes=usable, headroom=headroom, precision=precision,
                attention=kind, mfu=mfu, fitting=fitting, excluded=excluded)


def _check_options(nodes, gpus_per_node, global_batch, recompute, mfu, headroom) -> None:
    for option, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if value < 1:
            raise OptionError(option, f"must be >= 1, got {value}")
    if global_batch is not None and global_batch < 1:
        raise OptionError("global_batch", f"must be >= 1 (packs per step), got {global_batch}")
    unknown = [r for r in recompute if r not in RECOMPUTE]
    if unknown or not recompute:
        raise OptionError("recompute", f"{','.join(recompute)!r}: give a comma-separated subset of "
                          f"{', '.join(RECOMPUTE)}")
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise OptionError("mfu", f"{mfu} must be in (0, 1] (the assumed share of the peak FLOP rate, e.g. 0.4)")
    if not (math.isfinite(headroom) and 0 <= headroom < 1):
        raise OptionError("headroom", f"{headroom} must be in [0, 1) (the share of GPU memory kept free, e.g. 0.1)")


def _assess(cfg: Config, layout: Layout, workload: Workload, gpu: Gpu, gpus_per_node: int, usable: float,
            precision: Precision, kind: str, mfu: float) -> Assessment:
    at_layout = updated(cfg, parallel={"tp": layout.tp, "pp": layout.pp, "cp": layout.cp},
                        model={"recompute": layout.recompute})
    try:
        validate(at_layout, layout.world, with_data=False)
    except MegalignError as e:
        return Assessment(layout, reason=str(e))
    if layout.tp > gpus_per_node or gpus_per_node % layout.tp:
        return Assessment(layout, reason=f"tp={layout.tp} would span nodes of {gpus_per_node} GPUs (tensor "
                                         "parallelism needs the GPUs of one node)")
    m = at_layout.model
    micro_batches = cfg.training.global_batch // layout.dp
    memory = estimate(m, layout, workload, precision, kind, micro_batches)
    if memory.total > usable:
        return Assessment(layout, memory, reason=memory_reason(memory, usable, layout.pp))
    time = step_time(m, layout, workload, cfg.training.global_batch, gpu, gpus_per_node, precision, mfu)
    return Assessment(layout, memory, time)


def memory_reason(memory: MemoryEstimate, usable: float, pp: int) -> str:
    """'memory 93.1 GiB > 72.0 GiB usable: activations 61.0, optimizer 20.1, weights 6.3 GiB' (its largest terms)."""
    largest = sorted(memory.terms().items(), key=lambda kv: -kv[1])[:3]
    terms = ", ".join(f"{MEMORY_TERMS[name]} {value / GIB:.1f}" for name, value in largest)
    stage = f" on pipeline stage {memory.stage}" if pp > 1 else ""
    return f"memory {memory.total / GIB:.1f} GiB > {usable / GIB:.1f} GiB usable{stage}: {terms} GiB"
