"""Process groups and devices: torch.distributed (NCCL on GPU, gloo on CPU), megatron's parallel state, and the
`Runtime` that says where this process computes (the only place that decides between GPU and CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megalign.config import Config
from megalign.errors import MegalignError
from megalign.parallel.launcher import adopt_launcher_env


@dataclass(frozen=True)
class Layout:
    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int = 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes: its place in the layout, the device of its tensors, the device of
    tensors that take part in collectives (NCCL wants them on the GPU, gloo on the CPU) and the parameter dtype
    (bf16 on GPU, fp32 in the CPU mode)."""

    layout: Layout
    device: torch.device
    comm_device: torch.device
    params_dtype: torch.dtype

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise MegalignError("config key run.device: cuda asked for but CUDA is not available; use run.device=cpu")
    return requested


def initialize(cfg: Config, device: str | None = None) -> Runtime:
    """Start torch.distributed (a single process works without torchrun) and megatron's groups; the runtime.
    `device`: cpu or cuda (None: run.device)."""
    adopt_launcher_env()
    device = resolve_device(device or cfg.run.device)
    if device == "cpu":
        from megalign.parallel import cpu

        cpu.enable()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "gloo" if device == "cpu" else "nccl"
        timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
        if "RANK" in os.environ:  # torchrun / srun: the launcher's rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # one process without a launcher; the environment is left alone (child processes inherit it)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(  # its groups get the same timeout (megatron's default: 30 min)
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp, context_parallel_size=p.cp,
        distributed_timeout_minutes=p.timeout_minutes,
    )
    # megatron's RNG streams: the default one is the same on every rank; the tensor-parallel one differs
    # across TP ranks (dropout inside TP regions), as megatron means it to.
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    if device == "cpu":
        here = comm = torch.device("cpu")
    else:
        here = comm = torch.device("cuda", torch.cuda.current_device())
    return Runtime(layout=current_layout(), device=here, comm_device=comm,
                   params_dtype=torch.float32 if device == "cpu" else torch.bfloat16)


def current_layout() -> Layout:
    return Layout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
    )


def chunk_attention_kernel():
    """An exact kernel for a context-parallel chunk's attention (its queries against its sample's keys up to the
    chunk's end) that this process's device mode provides, or None: the CPU mode's (parallel/cpu_attention.py)."""
    from megalign.parallel import cpu, cpu_attention

    return cpu_attention.chunk_attention if cpu.is_enabled() and cpu_attention.AVAILABLE else None


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
