"""The planner's memory terms: hand-computed cases, and how they move with the layout."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megalign.config import ModelConfig, load_config, resolve
from megalign.model.arithmetic import parameter_count
from megalign.plan.layout import Layout
from megalign.plan.memory import (BF16, FP32, estimate, estimate_stage, estimate_stages, layer_bytes,
                                  stage_parameters)
from megalign.plan.workload import fixed_length

MIB = 2**20


def preset(name: str, **keys) -> ModelConfig:
    return dataclasses.replace(resolve(load_config(None, [f"model.preset={name}"])).model, **keys)


def layout(tp=1, pp=1, cp=1, dp=1, sp=None, recompute="none", distributed_optimizer=True) -> Layout:
    return Layout(tp, pp, cp, dp, tp > 1 if sp is None else sp, recompute, distributed_optimizer)


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-8b", "qwen2-7b", "llama3.2-1b", "chatglm3-6b"])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_the_stages_hold_the_whole_model_once(name, pp):
    m = preset(name)
    total = sum(stage_parameters(m, layout(pp=pp), s) for s in range(pp))
    tied_copy = m.padded_vocab_size * m.hidden_size if (m.tie_embeddings and pp > 1) else 0
    assert total == parameter_count(m, m.padded_vocab_size) + tied_copy


def test_weights_of_llama2_7b_by_hand():
    m = preset("llama2-7b")
    params = parameter_count(m, m.padded_vocab_size)
    assert params == 6_738_415_616
    state = estimate_stage(m, layout(), fixed_length(4096), BF16, "flash", 1, 0)
    assert state.weights == params * 2 and state.gradients == params * 4 and state.optimizer == params * 12
    # TP splits every weight matrix (embedding and output over the vocabulary); the norms are replicated
    replicated = (2 * 32 + 1) * 4096
    at_tp2 = estimate_stage(m, layout(tp=2), fixed_length(4096), BF16, "flash", 1, 0)
    assert at_tp2.weights == ((params - replicated) // 2 + replicated) * 2
    # PP=4: 8 layers on each stage, the embedding on the first, the output layer and final norm on the last
    layer = (params - 2 * 32000 * 4096 - 4096) // 32
    first = estimate_stage(m, layout(pp=4), fixed_length(4096), BF16, "flash", 1, 0)
    assert first.weights == (8 * layer + 32000 * 4096) * 2


def test_the_distributed_optimizer_shards_over_dp_and_cp():
    m = preset("llama2-7b")
    one = estimate_stage(m, layout(), fixed_length(4096), BF16, "flash", 8, 0)
    for dp, cp in [(2, 1), (4, 1), (2, 2), (1, 8)]:
        sharded = estimate_stage(m, layout(dp=dp, cp=cp), fixed_length(4096), BF16, "flash", 8, 0)
        assert sharded.optimizer == pytest.approx(one.optimizer / (dp * cp))
        assert sharded.weights == one.weights and sharded.gradients == one.gradients
        replicated = estimate_stage(m, layout(dp=dp, cp=cp, distributed_optimizer=False), fixed_length(4096),
                                    BF16, "flash", 8, 0)
        assert replicated.optimizer == one.optimizer
    assert estimate_stage(m, layout(), fixed_length(4096), FP32, "cpu", 1, 0).optimizer == \
        parameter_count(m, m.padded_vocab_size) * 8  # fp32 weights: no master copy, Adam's m and v


def test_one_layer_saves_what_autograd_saves():
    """h=256, f=704, 4 heads / 2 groups of 64, 2048 tokens, fp32: what autograd's saved-tensor hooks counted in
    the CPU mode, tensor by tensor (52.55 MiB per layer): 6,726 values per token."""
    m = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=2,
                    vocab_size=1024)
    one = layer_bytes(m, layout(), 2048, FP32, "cpu")
    by_hand = {"sequence": 2 * (2 * 256 + 1) + 2 * 256, "rope": 4 * 64, "attention": (6 + 8 + 4) * 64 + 4,
               "projection": 4 * 64, "mlp": 5 * 704}
    for term, values in by_hand.items():
        assert getattr(one, term) == values * 4 * 2048, term
    assert one.saved == 6726 * 4 * 2048
    assert one.saved / MIB == pytest.approx(52.55, abs=0.01)


def test_cp_keeps_the_gathered_keys_and_values():
    m = preset("llama3-8b")
    n = 4096
    for cp in (2, 4, 8):
        one = layer_bytes(m, layout(cp=cp), n, BF16, "flash")
        assert one.kv_gather == n * (2 * cp + 1) * 8 * 128 * 2  # (2cp+1)/2 rows per token, k and v, 8 groups
        assert layer_bytes(m, layout(cp=cp), n, BF16, "te").kv_gather == 0  # TE's ring keeps local K/V only


PRESETS = st.sampled_from(["llama2-7b", "llama3-8b", "qwen2-7b", "llama3.2-1b"])
KINDS = st.sampled_from(["flash", "te", "cpu"])
RECOMPUTE = st.sampled_from(["none", "selective", "full"])


def step_memory(m, lay, seq, kind, micro_batches=1, precision=BF16):
    e = estimate(m, lay, fixed_length(seq), precision, kind, micro_batches)
    return e.activations + e.kv_gather + e.logits


@settings(max_examples=30)
@given(PRESETS, KINDS, RECOMPUTE, st.sampled_from([4096, 32768, 131072]), st.booleans())
def test_more_tp_or_cp_never_increases_per_gpu_activations(name, kind, recompute, seq, sp):
    m = preset(name, max_position_embeddings=131072)
    for tp_small, tp_large in [(1, 2), (2, 4), (4, 8)]:
        if m.query_groups % tp_large:
            continue
        small = step_memory(m, layout(tp=tp_small, sp=sp and tp_small > 1, recompute=recompute), seq, kind)
        large = step_memory(m, layout(tp=tp_large, sp=sp, recompute=recompute), seq, kind)
        assert large <= small
    for cp_small, cp_large in [(1, 2), (2, 4), (4, 8), (8, 16)]:
        small = step_memory(m, layout(cp=cp_small, recompute=recompute), seq, kind)
        large = step_memory(m, layout(cp=cp_large, recompute=recompute), seq, kind)
        assert large <= small


@settings(max_examples=30)
@given(PRESETS, KINDS, st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]))
def test_recompute_and_sequence_parallelism_save_memory(name, kind, tp, cp):
    m = preset(name)
    peaks = [estimate(m, layout(tp=tp, cp=cp, recompute=r), fixed_length(8192), BF16, kind, 1).step
             for r in ("none", "selective", "full")]
    assert peaks[0] >= peaks[1] >= peaks[2]
    if tp > 1:
        with_sp = estimate(m, layout(tp=tp, cp=cp, sp=True), fixed_length(8192), BF16, kind, 1)
        without = estimate(m, layout(tp=tp, cp=cp, sp=False), fixed_length(8192), BF16, kind, 1)
        assert with_sp.activations < without.activations


def test_the_first_pipeline_stage_holds_pp_micro_batches_in_flight():
    m = preset("llama2-7b")
    lay = layout(pp=4)
    one, many = (estimate_stages(m, lay, fixed_length(8192), BF16, "flash", k) for k in (1, 16))
    per_micro_batch = one[0].activations
    assert many[0].activations == pytest.approx(4 * per_micro_batch)  # stage i: pp - i in flight
    assert many[1].activations == pytest.approx(3 * one[1].activations)
    assert many[3].activations == pytest.approx(one[3].activations)  # the last stage: one at a time
    assert estimate(m, lay, fixed_length(8192), BF16, "flash", 16).stage == 0
    two = estimate_stages(m, lay, fixed_length(8192), BF16, "flash", 2)
    assert two[0].activations == pytest.approx(2 * per_micro_batch)  # never more than there are micro-batches


def test_logits_are_fp32_and_split_by_tp():
    m = preset("llama3-8b")
    for tp in (1, 2, 4, 8):
        last = estimate(m, layout(tp=tp), fixed_length(8192), BF16, "flash", 1)
        assert last.logits == 8192 * 128256 / tp * 4
