"""CPU mode: run megatron-core on CPU with gloo by emulating the few CUDA calls it hard-codes.

megatron-core has no CPU path; it asks CUDA for the current device, forks CUDA RNG states for tensor-parallel
streams, allocates some buffers with device="cuda" and checks `tensor.type()` names. `enable()` maps each of
those onto the CPU (docs/architecture.md, "Devices and the CPU mode", says why each one is needed). This module
and its attention kernel (cpu_attention.py, handed out by parallel/setup.py) are the only ones that know about
it; everything else is written as if for a GPU.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int device means cuda:N


def _cpu_device(device):
    return torch.device("cpu") if _is_cuda(device) else device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" (and .to("cuda")) in every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


_original_type = torch.Tensor.type


def _type_as_if_on_cuda(self, dtype=None, non_blocking=False, **kwargs):
    """`t.type()` answers 'torch.cuda.FloatTensor' for a CPU float tensor (megatron's optimizers check it)."""
    if dtype is None and not kwargs:
        name = _original_type(self)  # may come back through the function mode already renamed
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            name = name.replace("torch.", "torch.cuda.", 1)
        return name
    return _original_type(self, dtype, non_blocking, **kwargs)


def enable() -> None:
    """Install the emulation (idempotent). Call once per process, before building megatron objects."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CPU mode asked for on a machine with CUDA; use device: cuda (or hide the GPUs)")
    import megatron.core.tensor_parallel.random as mcore_random

    # 1. Allocation: the "current CUDA device" is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.device_count = lambda: 0
    # 2. RNG: megatron's CUDA RNG tracker forks per-stream states; map them onto the CPU generator so that
    #    fork() really switches streams (left alone, _set_cuda_rng_state queues a callback that never runs).
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it: must not recurse
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # The tracker warns when the CPU stream moves inside a CUDA fork; here the CPU stream IS the CUDA one.
    logging.getLogger(mcore_random.__name__).addFilter(lambda r: "CPU RNG state changed" not in r.getMessage())
    # 3-6. Hard-coded devices, type names, .cuda() and synchronisation.
    _CudaToCpu().__enter__()  # for the life of the process
    torch.Tensor.type = _type_as_if_on_cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    _enabled = True


def is_enabled() -> bool:
    return _enabled

