"""Build megatron-core's GPTModel (Llama-family options) for this rank's TP/PP position."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megalign.config import Config
from megalign.model.attention import CORE_ATTENTION
from megalign.model.gpt import MegalignGPTModel
from megalign.model.norm import SequenceParallelTorchNorm


def transformer_config(cfg: Config, params_dtype: torch.dtype, random_init: bool = True) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    recompute = {}
    if m.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif m.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        # activations outside attention and MLP split over TP along the sequence (the batch pads every rank's
        # share to a multiple of tp: training/batch.py)
        sequence_parallel=p.sp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # megatron's own init runs (it is what marks parameters tensor-parallel), then megalign.model.init
        # redraws every weight so that the full model is the same at every layout.
        # Without random_init (a converter overwriting every weight at TP=1) that pass is skipped: it is slow
        # (~10 s per 1B parameters on 2 cores) and, at TP>1, the only thing that marks TP shards.
        use_cpu_initialization=False,
        perform_initialization=random_init,
        # Packed micro-batches differ in length: p2p sends shapes first (megatron needs the alltoall
        # dispatcher setting for that, even without MoE).
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # LongAlign weighting: each micro-batch returns (weighted loss sum, count), megatron divides by the
        # global count (see training/loss.py).
        calculate_per_token_loss=True,
        # Fused kernels come from TE/Apex; the plain-torch path must not ask for them.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        # GLM rotates (even, odd) pairs; megatron's unfused RoPE does it in both the THD and SBHD paths.
        rotary_interleaved=m.rotary_interleaved,
        **recompute,
    )


def layer_spec(backend: str, config: TransformerConfig) -> ModuleSpec | TransformerBlockSubmodules:
    """TE's own spec for `te` (its norms and linears handle sequence parallelism themselves). Otherwise the local
    (plain megatron-core) spec with a THD-capable core attention, and norms that allow sequence parallelism
    (model/norm.py) in the layers and after the last one: a block spec for this stage's layers, since the
    block's final norm comes from the block spec, not the layer's."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=config.normalization))
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = CORE_ATTENTION[backend]
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.causal}
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelTorchNorm)


def build_model(cfg: Config, backend: str, params_dtype: torch.dtype = torch.float32,
                random_init: bool = True) -> GPTModel:
    """This rank's piece of the model (layers of its PP stage, its TP shard), weights not yet drawn.

    RoPE: megatron's rotary module with HF's frequencies for every model.rope_scaling, read at the batch's
    position_ids when given (see model/rope.py); megatron's own scaling options stay off. The padded vocabulary
    takes no part in the loss (model/gpt.py).
    """
    m = cfg.model
    config = transformer_config(cfg, params_dtype, random_init)
    return MegalignGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(backend, config),
        vocab_size=m.padded_vocab_size,
        tokenizer_vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_model=m,
    )
