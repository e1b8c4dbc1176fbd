"""Modelled time of one optimizer step at a layout: for ranking layouts, not a promise of seconds.

  compute    the step's training FLOPs (model/arithmetic.py: dense per token, causal attention per sample, x3
             for forward + backward), plus what recompute adds (full: every layer's forward again; selective: the
             attention forward), over world x peak x MFU. The MFU is an assumption (--mfu), the same for every
             layout: what a layout changes is the communication and the bubble below.
  tp         per layer and micro-batch, megatron's tensor-parallel collectives on n x h x b bytes (n tokens on
             the rank): all-reduce or all-gather + reduce-scatter, 2(tp-1)/tp of it, twice forward, twice
             backward, plus SP's re-gather in backward and the recomputed forward; over NVLink.
  cp         all-gather CP: each layer gathers k and v ((cp-1) x n x 2g x d x b / tp received) and reduce-scatters
             their gradients, again for a recomputed forward; over NVLink when tp x cp fits in a node.
  pp         the 1F1B bubble, (pp-1) / micro-batches of the stage's busy time, and the activations sent between
             stages (forward and backward, per micro-batch).
  dp         the distributed optimizer's reduce-scatter of fp32 gradients and all-gather of the weights over
             dp x cp (an all-reduce without it), not overlapped (overlap_grad_reduce is off in the trainer).
Groups follow megatron's rank order (tp fastest, then cp, dp, pp): a group stays inside a node while the ranks it
spans fit in one, else it runs at the network's rate. No overlap of communication with compute is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalign.config import ModelConfig
from megalign.model.arithmetic import attention_flops, dense_flops_per_token
from megalign.plan.hardware import Gpu
from megalign.plan.layout import Layout
from megalign.plan.memory import GRADIENT_BYTES, Precision, row_tokens, stage_parameters
from megalign.plan.workload import Workload


@dataclass(frozen=True)
class StepTime:
    compute: float
    tp: float
    cp: float
    pp: float
    dp: float
    tokens: float  # real tokens per step

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.cp + self.pp + self.dp

    def tokens_per_second_per_gpu(self, world: int) -> float:
        return self.tokens / self.total / world


def pack_flops(m: ModelConfig, workload: Workload, recompute: str) -> float:
    """Training FLOPs of the mean pack, with what recompute adds."""
    dense = dense_flops_per_token(m, m.padded_vocab_size)
    attention = attention_flops(m, [workload.equivalent_sample_length])
    flops = 3.0 * (workload.mean_pack_tokens * dense + attention)
    if recompute == "full":
        layers_dense = dense - 2.0 * m.hidden_size * m.padded_vocab_size  # the logits are not recomputed
        flops += workload.mean_pack_tokens * layers_dense + attention
    elif recompute == "selective":
        flops += attention
    return flops


def _bandwidth(gpu: Gpu, ranks_spanned: int, gpus_per_node: int) -> float:
    return (gpu.intra_node_gbs if ranks_spanned <= gpus_per_node else gpu.inter_node_gbs) * 1e9


def step_time(m: ModelConfig, layout: Layout, workload: Workload, global_batch: int, gpu: Gpu, gpus_per_node: int,
              precision: Precision, mfu: float) -> StepTime:
    b = precision.activation_bytes
    micro_batches = global_batch // layout.dp
    world = layout.world
    compute = global_batch * pack_flops(m, workload, layout.recompute) / (world * gpu.bf16_tflops * 1e12 * mfu)

    tokens = workload.mean_pack_tokens * row_tokens(workload, layout) / workload.seq_length  # with CP/SP padding
    n = tokens / layout.cp
    layers = m.num_layers // layout.pp
    forwards = 2 if layout.recompute == "full" else 1  # times each layer's forward runs
    tp_time = 0.0
    if layout.tp > 1:
        collectives = 4 * forwards + 4 + (2 if layout.sp else 0)  # in units of (tp-1)/tp x n x h x b
        volume = collectives * (layout.tp - 1) / layout.tp * n * m.hidden_size * b
        tp_time = micro_batches * layers * volume / _bandwidth(gpu, layout.tp, gpus_per_node)
    cp_time = 0.0
    if layout.cp > 1:
        gathers = forwards + (1 if layout.recompute == "selective" else 0) + 1  # forward(s) + the gradient's
        volume = gathers * (layout.cp - 1) * n * 2 * m.query_groups * m.head_dim * b / layout.tp
        cp_time = micro_batches * layers * volume / _bandwidth(gpu, layout.tp * layout.cp, gpus_per_node)
    pp_time = 0.0
    if layout.pp > 1:
        busy = compute + tp_time + cp_time
        sent = 2 * micro_batches * (n / layout.tp if layout.sp else n) * m.hidden_size * b
        pp_time = busy * (layout.pp - 1) / micro_batches + sent / _bandwidth(gpu, world // layout.pp + 1,
                                                                               gpus_per_node)
    dp_time = 0.0
    replicas = layout.dp * layout.cp  # the gradients are reduced over DP x CP
    if replicas > 1:
        params = max(stage_parameters(m, layout, s) for s in range(layout.pp))
        per_param = GRADIENT_BYTES + precision.param_bytes if layout.distributed_optimizer else 2 * GRADIENT_BYTES
        volume = per_param * params * (replicas - 1) / replicas
        dp_time = volume / _bandwidth(gpu, layout.tp * layout.cp * layout.dp, gpus_per_node)
    return StepTime(compute=compute, tp=tp_time, cp=cp_time, pp=pp_time, dp=dp_time,
                    tokens=global_batch * workload.mean_pack_tokens)
