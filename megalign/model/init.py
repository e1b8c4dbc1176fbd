"""Draw initial weights so that the same seed gives the same FULL model at every TP/PP layout.

megatron draws weights from per-rank RNG streams, so TP=2 and TP=1 start from different models. Here every
parameter is drawn whole from a generator seeded by (seed, its layout-free name), then this rank keeps its
TP shard: runs at different layouts are comparable from step 0.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def global_parameter_names(model) -> dict[str, str]:
    """Local parameter name -> the name it has in the TP=1, PP=1 model (global layer numbers)."""
    names = {}
    layer_offset = {}
    for name, module in model.named_modules():
        if hasattr(module, "layer_number") and name.count(".") == 2 and ".layers." in name:
            layer_offset[name] = module.layer_number - 1  # layer_number is global and 1-based
    for name, _ in model.named_parameters():
        global_name = name
        for local_prefix, global_index in layer_offset.items():
            if name.startswith(local_prefix + "."):
                head = local_prefix.rsplit(".", 1)[0]
                global_name = f"{head}.{global_index}{name[len(local_prefix):]}"
                break
        if global_name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
            global_name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
        names[name] = global_name
    return names


def _draw(name: str, shape: tuple[int, ...], std: float, num_layers: int, seed: int, device) -> torch.Tensor:
    """The full tensor of a parameter, as megatron's default init would draw it (normal, scaled output)."""
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    module, _, leaf = name.rpartition(".")
    if "norm" in leaf or "norm" in module.rpartition(".")[2]:  # input_layernorm.weight, TE's layer_norm_weight
        return torch.ones(shape, device=device)
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = std / math.sqrt(2.0 * num_layers)  # megatron's scaled_init_method_normal
    return torch.empty(shape, device=device).normal_(0.0, std, generator=_generator(seed, name, device))


def _tp_shard(full: torch.Tensor, param, gated: bool) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if gated:  # fc1 holds [gate; up]: each rank keeps its chunk of both halves
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def initialize_weights(model, seed: int) -> None:
    """Fill every parameter of this rank's model piece from the layout-independent full model."""
    config = model.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    names = global_parameter_names(model)
    for local_name, param in model.named_parameters():
        name = names[local_name]
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= tp
        full = _draw(name, tuple(shape), config.init_method_std, config.num_layers, seed, param.device)
        gated = config.gated_linear_unit and "linear_fc1" in name
        param.copy_(_tp_shard(full, param, gated).to(param.dtype))
