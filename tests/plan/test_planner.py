"""The planner: which layouts it excludes and why, how it ranks the rest, its step-time model, its inputs."""

import dataclasses

import pytest

from megalign.config import load_config, resolve
from megalign.errors import MegalignError, OptionError
from megalign.plan.hardware import GIB, gpu
from megalign.plan.layout import Layout, candidates
from megalign.plan.memory import BF16
from megalign.plan.planner import plan
from megalign.plan.step_time import step_time
from megalign.plan.workload import fixed_length, from_metadata


def config(name="llama2-7b", *overrides):
    return resolve(load_config(None, [f"model.preset={name}", *overrides]))


def test_candidates_fill_the_cluster():
    found = candidates(16, None, True, ("none",))
    assert len(found) == 35  # (a, b, c) with a + b + c <= 4: tp, pp, cp as powers of 2 dividing 16
    assert all(c.world == 16 for c in found)
    assert all(c.sp == (c.tp > 1) for c in found)
    assert {c.sp for c in candidates(16, False, True, ("none",))} == {False}


def test_a_layout_that_does_not_fit_is_never_listed_as_fitting():
    result = plan(config("llama2-7b", "model.max_position_embeddings=65536"), fixed_length(65536),
                  gpu("h100-80g"), nodes=2)
    assert result.fitting and result.excluded
    for a in result.fitting:
        assert a.memory.total <= result.usable_bytes and a.reason is None
    for a in result.excluded:
        assert a.reason
        if a.memory is not None:
            assert a.memory.total > result.usable_bytes and a.reason.startswith("memory ")
    times = [a.time.total for a in result.fitting]
    assert times == sorted(times)  # best (fastest modelled step) first


def test_exclusion_reasons_are_one_line_each():
    result = plan(config("llama2-7b", "model.max_position_embeddings=65536"), fixed_length(65536),
                  gpu("h100-80g"), nodes=2, global_batch=8)
    reasons = {a.layout: a.reason for a in result.excluded}
    assert all("\n" not in r for r in reasons.values())
    tp16 = Layout(16, 1, 1, 1, True, "none")
    assert reasons[tp16] == "tp=16 would span nodes of 8 GPUs (tensor parallelism needs the GPUs of one node)"
    dp16 = Layout(1, 1, 1, 16, False, "none")
    assert reasons[dp16] == ("config key training.global_batch=8 must be a multiple of the data-parallel size 16; "
                             "try training.global_batch=16")
    full_tp2 = reasons[Layout(2, 1, 1, 8, True, "none")]
    assert full_tp2.startswith("memory ") and "GiB usable: activations " in full_tp2


def test_validate_gives_the_reason_for_heads_that_do_not_divide():
    cfg = config("llama2-7b", "model.num_attention_heads=24", "model.num_query_groups=24")  # 24 heads of 170
    result = plan(cfg, fixed_length(4096), gpu("h100-80g", memory_gib=1000), nodes=1, gpus_per_node=16)
    reasons = {a.layout: a.reason for a in result.excluded}
    assert reasons[Layout(16, 1, 1, 1, True, "none")].startswith(
        "config key parallel.tp=16 must divide model.num_attention_heads=24")
    assert Layout(8, 1, 1, 2, True, "none") in [a.layout for a in result.fitting]


def test_memory_reasons_name_the_largest_terms():
    cfg = config("llama2-7b", "model.max_position_embeddings=131072")
    result = plan(cfg, fixed_length(131072), gpu("a100-80g"), nodes=1, recompute=("none",))
    reason = {a.layout: a.reason for a in result.excluded}[Layout(1, 1, 1, 8, False, "none")]
    head, terms = reason.split(": ", 1)
    assert head.startswith("memory ") and head.endswith(f"> {80 * 0.9:.1f} GiB usable")
    assert terms.startswith("activations ") and terms.endswith(" GiB")


def test_a_bigger_gpu_fits_more_and_the_headroom_is_kept():
    cfg = config("llama2-7b", "model.max_position_embeddings=65536")
    small = plan(cfg, fixed_length(65536), gpu("h100-80g"), nodes=1)
    large = plan(cfg, fixed_length(65536), gpu("h200-141g"), nodes=1)
    assert {a.layout for a in small.fitting} < {a.layout for a in large.fitting}
    tight = plan(cfg, fixed_length(65536), gpu("h100-80g"), nodes=1, headroom=0.5)
    assert len(tight.fitting) < len(small.fitting)
    assert tight.usable_bytes == pytest.approx(gpu("h100-80g").memory_bytes / 2)


def test_step_time_terms():
    m = config().model
    g = gpu("h100-80g")
    lay = Layout(1, 1, 1, 8, False, "none")
    base = step_time(m, lay, fixed_length(8192), 8, g, 8, BF16, 0.4)
    assert base.tp == base.cp == base.pp == 0 and base.dp > 0
    tp = step_time(m, Layout(8, 1, 1, 1, True, "none"), fixed_length(8192), 8, g, 8, BF16, 0.4)
    assert tp.tp > 0 and tp.compute == pytest.approx(base.compute)  # the same FLOPs over the same 8 GPUs
    full = step_time(m, dataclasses.replace(lay, recompute="full"), fixed_length(8192), 8, g, 8, BF16, 0.4)
    assert full.compute == pytest.approx(base.compute * 4 / 3, rel=0.05)  # one more forward of the layers
    pipe = [step_time(m, Layout(1, 4, 1, 2, False, "none"), fixed_length(8192), gb, g, 8, BF16, 0.4)
            for gb in (8, 64)]
    assert pipe[0].pp / pipe[0].compute > pipe[1].pp / pipe[1].compute  # more micro-batches, a smaller bubble
    across = step_time(m, Layout(1, 1, 2, 8, False, "none"), fixed_length(8192), 8, g, 8, BF16, 0.4)
    inside = step_time(m, Layout(1, 1, 2, 4, False, "none"), fixed_length(8192), 8, g, 8, BF16, 0.4)
    assert across.cp > 0 and inside.cp > 0


def test_the_pack_length_must_fit_the_model():
    with pytest.raises(MegalignError, match="model.max_position_embeddings=4096: set model.max_position_embeddings"
                                            "=65536"):
        plan(config(), fixed_length(65536), gpu("h100-80g"), nodes=1)


@pytest.mark.parametrize("option,kwargs", [("nodes", {"nodes": 0}), ("gpus_per_node", {"gpus_per_node": 0}),
                                           ("mfu", {"mfu": 1.5}), ("headroom", {"headroom": 1.0}),
                                           ("recompute", {"recompute": ("some",)}),
                                           ("global_batch", {"global_batch": 0})])
def test_bad_options_name_the_option(option, kwargs):
    with pytest.raises(OptionError) as e:
        plan(config(), fixed_length(4096), gpu("h100-80g"), **{"nodes": 1, **kwargs})
    assert e.value.option == option


def test_a_dataset_workload_from_its_metadata():
    meta = {"seq_length": 8192, "num_packs": 10, "num_tokens": 70_000, "num_samples": 40,
            "tokenizer": {"vocab_size": 32000},
            "length_histogram": {"edges": [1, 2, 4, 8, 16], "counts": [0, 0, 30, 10]}}
    w = from_metadata(meta, "ds")
    assert (w.seq_length, w.mean_pack_tokens, w.mean_samples_per_pack, w.vocab_size) == (8192, 7000, 4, 32000)
    assert w.mean_square_tokens == pytest.approx((30 * (16 + 32 + 64) / 3 + 10 * (64 + 128 + 256) / 3) / 10)
    assert w.distinct_lengths == 10


def test_the_global_batch_and_gpu_catalogue():
    cfg = config()
    result = plan(cfg, fixed_length(4096), gpu("h100-80g"), nodes=1, global_batch=64)
    assert result.global_batch == 64 and result.cfg.training.global_batch == 64
    with pytest.raises(OptionError) as e:
        gpu("v100")
    assert e.value.option == "gpu"
    assert gpu("a800-80g", memory_gib=40).memory_gib == 40
    assert gpu("h200-141g").memory_bytes == pytest.approx(140.4 * GIB, rel=1e-3)
