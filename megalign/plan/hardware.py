"""The GPUs the planner knows: memory, dense bf16 peak, and the bandwidths its step-time model uses.

Memory is what the driver reports as total (nvidia-smi's MiB, here in GiB). Peak is the dense (no sparsity)
bf16 tensor-core rate of the SXM part. Bandwidths are per GPU and one direction, as a ring collective sees them:
NVLink inside a node (A800 is the export part with 400 GB/s NVLink, not A100's 600), InfiniBand between nodes
(one NIC per GPU: HDR 200 Gb/s for A100/A800 systems, NDR 400 Gb/s for H100/H200 ones). They rank layouts; a
cluster with other links is described by overriding them (`Gpu(..., inter_node_gbs=...)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megalign.errors import OptionError

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    intra_node_gbs: float  # NVLink, GB/s per direction
    inter_node_gbs: float  # network, GB/s per GPU per direction

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("a100-80g", memory_gib=80.0, bf16_tflops=312.0, intra_node_gbs=300.0, inter_node_gbs=25.0),
    Gpu("a800-80g", memory_gib=80.0, bf16_tflops=312.0, intra_node_gbs=200.0, inter_node_gbs=25.0),
    Gpu("h100-80g", memory_gib=81559 / 1024, bf16_tflops=989.0, intra_node_gbs=450.0, inter_node_gbs=50.0),
    Gpu("h200-141g", memory_gib=143771 / 1024, bf16_tflops=989.0, intra_node_gbs=450.0, inter_node_gbs=50.0),
)}


def gpu(name: str, memory_gib: float | None = None) -> Gpu:
    """A catalogue GPU by name, its memory replaced by `memory_gib` when given (a custom budget)."""
    if name not in GPUS:
        raise OptionError("gpu", f"{name!r} is unknown; one of {', '.join(GPUS)} (with --gpu-memory for another "
                          "memory size)")
    chosen = GPUS[name]
    if memory_gib is not None:
        if not memory_gib > 0:
            raise OptionError("gpu_memory", f"{memory_gib} must be > 0 (GiB per GPU)")
        chosen = dataclasses.replace(chosen, memory_gib=float(memory_gib))
    return chosen
