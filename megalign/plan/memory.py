"""Per-GPU memory of one training step at a layout: the model's state, and the peak of a step above it.

The activation terms follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(2022), re-derived for what megalign builds: megatron-core's local layer spec (or TE's), RMSNorm, SwiGLU, GQA,
RoPE, THD packs (no padding, no n x n scores: FlashAttention-style kernels), no dropout by default, the fused
kernels off (model/build.py). Each term below was checked tensor by tensor against what autograd saves in the
CPU mode (bench/plan_memory.py measures the totals).

Symbols: h hidden, f FFN, a heads, g query groups (KV heads), d head dim, r rotary dim, V padded vocabulary,
L_s layers of this stage, b activation bytes (2 bf16, 4 fp32), t = tp, c = cp. A micro-batch is one pack of
T tokens (the padded row: every sample padded to a multiple of 2c, and of t*c under sequence parallelism); this
rank holds n = T/c of them, and s = n/t outside attention and MLP under sequence parallelism (SP), else s = n.

Model state (kept between steps):
  weights      P_rank x param bytes (bf16 on GPU, fp32 in the CPU mode). P_rank: this stage's layers with their
               linear weights split by t (norms and row-parallel biases replicated), the embedding on the first
               stage and the output layer (+ final norm) on the last, both split by t over the padded vocabulary
               (with tied embeddings under PP the last stage keeps its own copy).
  gradients    P_rank x 4: DDP's main grads are fp32 (grad_reduce_in_fp32=True, training/trainer.py).
  optimizer    P_rank x 12 (bf16 weights: an fp32 master copy, Adam's m and v; fp32 weights: 8, no copy),
               / (dp x c) with the distributed optimizer (megatron shards it over the data-parallel group with
               CP), unsharded without.
  buffers      under SP, megatron's global memory buffer for the all-gathered input of a linear: n x h x b;
               and megatron's RoPE tables: GPTModel computes one per micro-batch (megalign then uses its own,
               model/rope.py) and RotaryEmbedding.forward's lru_cache keeps it, one per longest-sample length up
               to 32, each longest x r x 4 bytes (fp32), the longest of the whole row under CP too. A dataset is
               taken to fill the cache with tables of the pack length (an upper bound); packs of one length, one.
               On stages after the first, the last received input and its gradient, which the transformer block
               keeps (set_input_tensor): 2 x s x h x b.

Saved for backward, per layer and micro-batch, bytes (no recompute):
  norms + linear inputs  s x (6h + 2) x b: each RMSNorm saves its input, the normalised input and 1/rms
                 ((2h + 1) x b), each column-parallel linear its (un-gathered, under SP) input (h x b).
                 TE fuses norm and linear: s x (4h x b + 8).
  rope           n x 4r x b: cos and sin for q and for k (megatron's unfused RoPE; not split by TP).
  attention      n x [(a + g) + (a + 2g) + a] x d x b / t + n x 4a / t: the rotated q and k, the qkv output
                 (v is a view of it), the kernel's output and its fp32 log-sum-exp.
  projection     n x a x d x b / t: the input of the output projection.
  mlp            n x 5f x b / t: fc1's output (2f), silu(gate) (f), the linear half (f: megatron adds
                 glu_linear_offset, a new tensor), fc2's input (f). GELU: 2f.
  dropout        s x 2h bytes of masks when model.hidden_dropout > 0.
Context parallelism (all-gather CP: megalign's own for flash, torch, sdpa): k and v are gathered from the CP
group and each chunk keeps its sample's keys up to its end: (2c + 1) / 2 rows per local token, so
  kv_gather      n x (2c + 1) x g x d x b / t, and the attention term loses k and the qkv output (nothing else
                 keeps them): n x [2a x d x b + 4a] / t.
  TE's CP (ring, p2p) keeps only local K/V: the no-CP attention term of its n tokens.
  The CPU mode's chunk kernel (parallel/cpu_attention.py) saves contiguous, GQA-expanded copies (a heads):
  n x (2c + 1) x a x d x b / t on ranks > 0, somewhat less on rank 0 (see _cpu_chunk_attention).
Recompute (model.recompute):
  selective      megatron recomputes core attention: its saved inputs q, k, v (qkv output) are
                 n x (2a + 3g) x d x b / t; the output, log-sum-exp and gathered K/V are not kept.
  full           every layer (uniform, 1 layer per checkpoint) keeps only its input, s x h x b; one layer's
                 whole set is rebuilt during its backward (a transient).
Per stage and micro-batch:
  first stage    token ids (8 bytes per token); every stage the RoPE angles of the whole row, 4r x T (fp32)
  non-last stage the stage's output, kept by the 1F1B schedule for its backward (s x h x b)
  last stage     final norm and output-layer input as above, loss bookkeeping (~24 bytes per token) and
  logits         n x V / t x 4: megatron's cross-entropy keeps the fp32 softmax (computed in place).
Pipeline: under 1F1B stage i holds min(pp - i, micro-batches) micro-batches in flight (stage 0 the most);
without PP one at a time.

Transients (the peak above everything saved; the largest of):
  loss forward   the logits in b, a masked copy when the padded vocabulary columns sit on this rank
                 (model/gpt.py), the fp32 copy when b < 4; minus the softmax already counted.
  loss backward  the gradient back in b (b < 4), the masked_fill gradient (padded), each next to the one before
                 it, then the output layer's weight gradient (V / t x h x param bytes) and input gradient
                 (n x h x b) next to the last.
  layer backward MLP: n x 2f x b / t (SwiGLU's gradients next to its saved tensors) + 2 x n x h x b (incoming
                 and input gradients); attention (FlashAttention-2): dq, its fp32 accumulator, dk/dv over the
                 (gathered) key rows, GQA-expanded dk/dv; under recompute, the recomputed set of one layer.
                 Counted after the last stage's loss tensors are freed.
  CPU mode only  after the backward, every activation freed: gloo's reduce-scatter (the distributed optimizer's)
                 clones the whole fp32 gradient buffer (P_rank x 4), and torch's AdamW (megatron's fallback
                 without TE or Apex) makes two temporaries of a parameter shard (the largest: 2 x its bytes).
                 On GPU NCCL reduces in place and TE's or Apex's fused Adam works in small chunks.
Not modelled: the CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation (the planner keeps a
headroom for them), attention dropout, the fused optimizers' chunked temporaries on GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from megalign.config import ModelConfig
from megalign.plan.layout import Layout
from megalign.plan.workload import Workload

GRADIENT_BYTES = 4  # DDP main grads: grad_reduce_in_fp32=True (training/trainer.py)
# what the attention kernels keep (see the module docstring); "cpu" is the CPU mode: its sdpa kernels, gloo, fp32
ATTENTION_KINDS = ("flash", "te", "cpu")


@dataclass(frozen=True)
class Precision:
    """The dtypes of a run: bf16 on GPU (fp32 master weights in the optimizer), fp32 in the CPU mode."""

    name: str
    param_bytes: int
    activation_bytes: int
    optimizer_bytes: int  # per parameter, before sharding: fp32 master (bf16 only) + Adam's m and v


BF16 = Precision("bf16", 2, 2, 12)
FP32 = Precision("fp32", 4, 4, 8)


def attention_kind(backend: str, device: str = "cuda") -> str:
    """What the memory model assumes for model.attention_backend: `te` (TE's kernels and ring CP), `cpu` (the CPU
    mode), else `flash` (FlashAttention-style kernels with megalign's all-gather CP; `auto` is taken to be one of
    them, the larger-memory case: pass model.attention_backend=te to plan for TransformerEngine)."""
    if device == "cpu":
        return "cpu"
    return "te" if backend == "te" else "flash"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on pipeline stage `stage` (the worst stage, when returned by `estimate`)."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    kv_gather: float
    logits: float
    transient: float

    @property
    def model_state(self) -> float:
        """What stays between steps."""
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def step(self) -> float:
        """The peak of a step above the model state."""
        return self.activations + self.kv_gather + self.logits + self.transient

    @property
    def total(self) -> float:
        return self.model_state + self.step

    def terms(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stage"}


# -- model state ---------------------------------------------------------------------------------------------
def layer_parameters(m: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (column/row-parallel weights split, norms replicated)."""
    d, groups, heads = m.head_dim, m.query_groups, m.num_attention_heads
    qkv_out = (heads + 2 * groups) * d
    mlp_out = m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)
    h = m.hidden_size
    split = h * qkv_out + heads * d * h + h * mlp_out + m.ffn_hidden_size * h
    if m.add_qkv_bias or m.add_bias_linear:
        split += qkv_out
    if m.add_bias_linear:
        split += mlp_out
    replicated = 2 * _norm_parameters(m) + (2 * h if m.add_bias_linear else 0)  # + row-parallel biases
    return split // tp + replicated


def _norm_parameters(m: ModelConfig) -> int:
    return m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)


def stage_parameters(m: ModelConfig, layout: Layout, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage `stage`."""
    embedding = m.padded_vocab_size * m.hidden_size // layout.tp
    count = m.num_layers // layout.pp * layer_parameters(m, layout.tp)
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        count += embedding
    if last:
        count += _norm_parameters(m)
        if not m.tie_embeddings or not first:  # tied under PP: the last stage keeps its own copy
            count += embedding
    return count


def model_state(m: ModelConfig, layout: Layout, stage: int, precision: Precision) -> dict[str, float]:
    params = stage_parameters(m, layout, stage)
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    return {"weights": params * precision.param_bytes, "gradients": params * GRADIENT_BYTES,
            "optimizer": params * precision.optimizer_bytes / shards}


# -- tokens ---------------------------------------------------------------------------------------------------
def sample_multiple(layout: Layout) -> int:
    """What each sample is padded to a multiple of (parallel/context.py sample_multiple)."""
    if layout.cp == 1:
        return 1
    return math.lcm(2 * layout.cp, layout.tp * layout.cp) if layout.sp else 2 * layout.cp


def row_tokens(workload: Workload, layout: Layout) -> float:
    """Tokens of the longest micro-batch after the padding CP and SP add (one sample: rounded up exactly; several:
    half a multiple per sample on average)."""
    multiple = sample_multiple(layout)
    tokens = workload.seq_length
    if multiple > 1:
        if workload.mean_samples_per_pack <= 1:
            tokens = -(-tokens // multiple) * multiple
        else:
            tokens += workload.mean_samples_per_pack * (multiple - 1) / 2
    elif layout.sp:
        tokens = -(-tokens // layout.tp) * layout.tp  # one padding segment at the pack's end (training/batch.py)
    return float(tokens)


# -- activations -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerBytes:
    """Bytes one layer keeps for its backward, for one micro-batch, without recompute; and its transients."""

    sequence: float  # norms and linear inputs (s tokens)
    rope: float
    attention: float  # q/k/v/out/lse as the kernel keeps them (without the gathered K/V)
    kv_gather: float
    projection: float
    mlp: float
    dropout: float
    layer_input: float  # s x h x b: what full recompute keeps
    attention_backward: float  # attention's gradient workspace
    mlp_backward: float  # the MLP's gradients next to its saved tensors
    recompute_inputs: float  # selective: what the core-attention checkpoint keeps instead of `attention`
    attention_output: float  # the kernel's output and log-sum-exp (what selective recompute does not keep)

    @property
    def saved(self) -> float:
        return self.sequence + self.rope + self.attention + self.projection + self.mlp + self.dropout


def layer_bytes(m: ModelConfig, layout: Layout, n: float, precision: Precision, kind: str) -> LayerBytes:
    """One layer's bytes for a micro-batch of which this rank holds `n` tokens (see the module docstring)."""
    b, tp, cp = precision.activation_bytes, layout.tp, layout.cp
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    heads, groups = m.num_attention_heads, m.query_groups
    rot = int(d * m.rotary_percent)
    s = n / tp if layout.sp else n
    sequence = s * ((4 * h * b + 8) if kind == "te" else (6 * h + 2) * b)
    lse = n * 4 * heads / tp
    qkv_output = (heads + 2 * groups) * d
    if cp == 1 or kind == "te":
        attention, kv = n * ((heads + groups) * d + qkv_output + heads * d) * b / tp + lse, 0.0
    elif kind == "flash":
        attention, kv = n * 2 * heads * d * b / tp + lse, n * (2 * cp + 1) * groups * d * b / tp
    else:
        attention, kv = _cpu_chunk_attention(n, heads, groups, d, b, tp, cp, lse)
    mlp = n * (5 if m.activation == "swiglu" else 2) * f * b / tp

    key_rows = 1.0 if cp == 1 or kind == "te" else (2 * cp + 1) / 2  # key rows per local token
    kv_heads = heads if (kind == "cpu" and cp > 1) else groups
    attention_backward = n / tp * d * (heads * (b + (4 if kind != "cpu" else 0))  # dq (+ FA2's fp32 accumulator)
                                       + key_rows * 2 * kv_heads * b)  # dk, dv
    if kind == "flash" and heads != groups:
        attention_backward += n / tp * d * key_rows * 2 * heads * b  # FA2 expands dk/dv to every query head
    if cp > 1 and kind != "te":
        attention_backward += n / tp * d * cp * 2 * groups * b  # the gathered K/V's gradient, before its reduce
    if cp > 1 and kind == "te":
        attention_backward += n / tp * d * 2 * 2 * groups * b  # the ring's two K/V chunks in flight
    return LayerBytes(
        sequence=sequence, rope=n * 4 * rot * b, attention=attention, kv_gather=kv, projection=n * heads * d * b / tp,
        mlp=mlp, dropout=s * 2 * h if m.hidden_dropout > 0 else 0.0, layer_input=s * h * b,
        attention_backward=attention_backward,
        mlp_backward=n * (2 if m.activation == "swiglu" else 1) * f * b / tp + 2 * n * h * b,
        recompute_inputs=n * (2 * heads + 3 * groups) * d * b / tp, attention_output=n * heads * d * b / tp + lse)


def _cpu_chunk_attention(n, heads, groups, d, b, tp, cp, lse) -> tuple[float, float]:
    """(attention, kv) of the CPU mode under CP, for its worse rank. Ranks > 0: both chunks go through the chunk
    kernel, which keeps a contiguous copy of q and GQA-expanded K/V over (2c + 1) / 2 rows per token. Rank 0's
    first chunk attends to itself only: plain SDPA on views, which keeps the rotated q and the gathered K/V
    (g heads); its second chunk goes through the kernel (2c rows of K/V per 2 tokens, a heads)."""
    other = (n * 2 * heads * d * b / tp + lse, n * (2 * cp + 1) * heads * d * b / tp)
    first = (n * 2.5 * heads * d * b / tp + lse, n * ((2 * cp + 1) * groups + 2 * cp * heads) * d * b / tp)
    return max(other, first, key=sum)


def estimate_stage(m: ModelConfig, layout: Layout, workload: Workload, precision: Precision, kind: str,
                   micro_batches: int, stage: int) -> MemoryEstimate:
    """Per-GPU memory on pipeline stage `stage`: model state, and a step's peak above it."""
    b = precision.activation_bytes
    tokens = row_tokens(workload, layout)
    n = tokens / layout.cp
    s = n / layout.tp if layout.sp else n
    h = m.hidden_size
    layers = m.num_layers // layout.pp
    first, last = stage == 0, stage == layout.pp - 1
    one = layer_bytes(m, layout, n, precision, kind)
    rot = int(m.head_dim * m.rotary_percent)

    if layout.recompute == "full":
        per_layer, per_layer_kv = one.layer_input, 0.0
    elif layout.recompute == "selective":
        per_layer, per_layer_kv = one.saved - one.attention + one.recompute_inputs, 0.0
    else:
        per_layer, per_layer_kv = one.saved, one.kv_gather
    extras = 4 * rot * tokens + (8 * n if first else 0.0)
    last_extras = 0.0
    if last:
        norm = s * ((h * b + 4) if kind == "te" else (2 * h + 1) * b)
        last_extras = norm + s * h * b + 24 * n
    else:
        extras += s * h * b  # this stage's output, kept by the schedule until its backward
    vocab_local = m.padded_vocab_size / layout.tp
    logits = n * vocab_local * 4 if last else 0.0

    in_flight = min(layout.pp - stage, micro_batches) if layout.pp > 1 else 1
    activations = in_flight * (layers * per_layer + extras) + last_extras
    kv_gather = in_flight * layers * per_layer_kv

    # the transient on top of everything saved, at its worst moment
    backward = max(one.attention_backward, one.mlp_backward)
    if layout.recompute == "full":
        backward += one.saved + one.kv_gather - one.layer_input  # the layer rebuilt for its backward
    elif layout.recompute == "selective":
        backward += one.attention_output + one.kv_gather  # core attention rebuilt for its backward
    transient = backward - (last_extras + logits)  # the layers' backward runs after the loss tensors are freed
    if last:
        padded = m.vocab_size is not None and m.vocab_size < m.padded_vocab_size
        widen = 4 if b < 4 else 0  # megatron's cross-entropy works on an fp32 copy
        loss_forward = n * vocab_local * (b * (1 + padded) + widen) - logits
        transient = max(transient, loss_forward, _loss_backward(n * vocab_local, b, padded,
                                                                vocab_local * h * precision.param_bytes + n * h * b)
                        - logits)
    state = model_state(m, layout, stage, precision)
    if kind == "cpu":  # after the backward, with every activation freed: the CPU mode's gloo and torch's AdamW
        saved = activations + kv_gather + logits
        params = stage_parameters(m, layout, stage)
        shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
        gradient_clone = params * GRADIENT_BYTES if layout.distributed_optimizer else 0.0
        adam = 2 * _largest_parameter(m, layout, first, last) / shards * 4
        transient = max(transient, gradient_clone - saved, adam - saved)
    rope_tables = workload.distinct_lengths * tokens * rot * 4  # the longest sample is at most the row
    buffers = rope_tables + (n * h * b if layout.sp else 0.0) + (0.0 if first else 2 * s * h * b)
    return MemoryEstimate(stage=stage, **state, buffers=buffers, activations=activations,
                          kv_gather=kv_gather, logits=logits, transient=max(transient, 0.0))


def _loss_backward(elements: float, b: int, padded: bool, output_layer: float) -> float:
    """The most bytes alive from the cross-entropy's backward to the output layer's: the fp32 gradient (in the
    softmax's storage), its copy back to b bytes (b < 4), the masked_fill gradient (padded), then the output
    layer's weight and input gradients next to the last of them; each copy frees the one before it."""
    alive = peak = 4.0
    if b < 4:
        peak, alive = max(peak, alive + b), b
    if padded:
        peak, alive = max(peak, alive + b), b
    return max(peak * elements, alive * elements + output_layer)


def _largest_parameter(m: ModelConfig, layout: Layout, first: bool, last: bool) -> float:
    vocabulary = m.padded_vocab_size * m.hidden_size / layout.tp if (first or last) else 0.0
    mlp = m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1) * m.hidden_size / layout.tp
    return max(vocabulary, mlp)


def estimate_stages(m: ModelConfig, layout: Layout, workload: Workload, precision: Precision, kind: str,
                    micro_batches: int) -> list[MemoryEstimate]:
    return [estimate_stage(m, layout, workload, precision, kind, micro_batches, stage) for stage in range(layout.pp)]


def estimate(m: ModelConfig, layout: Layout, workload: Workload, precision: Precision, kind: str,
             micro_batches: int) -> MemoryEstimate:
    """The stage that needs the most memory per GPU."""
    return max(estimate_stages(m, layout, workload, precision, kind, micro_batches), key=lambda e: e.total)
