"""The invariants, each in a real multi-process launch (torchrun, gloo, CPU mode):
a packed batch equals its samples run one by one; the loss and gradient norm of a global batch do not depend on
TP, PP, CP, DP, sequence parallelism, micro-batching or activation recomputation (for every loss mode); megatron's RNG streams behave as
megatron means them to; SkipAlign positions with zero skips are contiguous ones, and SkipAlign's loss does not
depend on the layout either."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


WORKER = Path(__file__).with_name("distributed_checks.py")
LAYOUTS = {
    "1 process": (1, []),
    "tp=2": (2, ["parallel.tp=2"]),  # sequence parallel (the default with tp > 1)
    "pp=2": (2, ["parallel.pp=2"]),
    "dp=2": (2, []),
    "cp=2": (2, ["parallel.cp=2"]),
    "cp=2 tp=2": (4, ["parallel.cp=2", "parallel.tp=2"]),
    "cp=2 dp=2": (4, ["parallel.cp=2"]),
    "cp=2 pp=2": (4, ["parallel.cp=2", "parallel.pp=2"]),
    "tp=2 pp=2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "recompute full": (1, ["model.recompute=full"]),
    "recompute selective": (1, ["model.recompute=selective"]),
}


@pytest.fixture(scope="module")
def results(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    common = [f"data.path={dataset}", "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
              "model.num_attention_heads=4", "model.num_query_groups=2", "training.global_batch=2",
              "training.lr=1e-2", "training.warmup_fraction=0", "training.steps=3", "run.device=cpu"]
    found = {}
    for name, (nproc, extra) in LAYOUTS.items():
        path = out / f"{name.replace(' ', '_').replace('=', '')}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(WORKER), str(path), *common, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        found[name] = json.loads(path.read_text())
    return found


def test_packed_batch_equals_samples_one_by_one(results):
    check = results["1 process"]["packed_vs_separate"]
    assert check["samples"] >= 3
    assert check["loss_max_abs_diff"] <= 1e-5 * check["loss_max"]
    assert check["grad_max_abs_diff"] <= 1e-5 * check["grad_max"]


def test_parameter_count_matches_the_built_model(results):
    counts = results["1 process"]["parameters"]
    assert counts["built"] == counts["counted"]


@pytest.mark.parametrize("layout", ["tp=2", "pp=2", "dp=2", "cp=2", "cp=2 tp=2", "cp=2 dp=2", "cp=2 pp=2",
                                    "tp=2 pp=2", "recompute full", "recompute selective"])
def test_loss_and_grad_norm_do_not_depend_on_layout(results, layout):
    reference, other = results["1 process"]["steps"], results[layout]["steps"]
    assert len(reference) == len(other) == 3  # one step per loss mode: sequence, token, pack
    for ref, got in zip(reference, other):
        assert got["sequences"] == ref["sequences"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert len({round(s["loss"], 6) for s in reference}) == 3  # the modes really differ


@pytest.mark.parametrize("layout", ["tp=2", "pp=2", "dp=2", "cp=2", "cp=2 tp=2", "cp=2 dp=2", "cp=2 pp=2",
                                    "tp=2 pp=2"])
def test_validation_loss_does_not_depend_on_layout(results, layout):
    reference, other = results["1 process"]["validation"], results[layout]["validation"]
    assert len(reference) == 2  # sequence and token weighting
    for ref, got in zip(reference, other):
        assert set(got) == set(ref) and {"loss/<64", "loss/64-256", "loss/>=256"} <= set(ref)
        assert got["sequences"] == ref["sequences"] and got["tokens"] == ref["tokens"]
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5), key
    assert reference[0]["loss"] != pytest.approx(reference[1]["loss"], rel=1e-4)  # the weightings really differ


def test_rng_streams_are_seeded_and_split_as_megatron_means(results):
    for name, r in results.items():
        assert r["rng"]["fork_restores_default_stream"], name
        assert r["rng"]["tp_stream_is_megatrons"], name
    tp = results["tp=2"]["rng"]["tp_streams"]
    assert tp[0] != tp[1]  # TP ranks draw from different model-parallel streams
    dp = results["dp=2"]["rng"]["tp_streams"]
    assert dp[0] == dp[1]  # DP replicas (same TP rank) share it


@pytest.mark.parametrize("layout", ["tp=2", "pp=2", "dp=2", "cp=2", "cp=2 tp=2", "cp=2 dp=2", "cp=2 pp=2", "tp=2 pp=2"])
def test_sequence_parallel_equals_no_sequence_parallel(results, layout):
    """At every TP layout the worker also ran the same three steps from the same weights with sequence
    parallelism off: the same losses and gradient norms (packs of odd lengths get a padding segment)."""
    if "tp=2" not in layout:
        assert "sequence_parallel_switched" not in results[layout]
        return
    on, off = results[layout]["steps"], results[layout]["sequence_parallel_switched"]
    for a, b in zip(on, off, strict=True):
        assert a["sequences"] == b["sequences"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("layout", ["cp=2", "cp=2 tp=2", "cp=2 dp=2", "cp=2 pp=2", "tp=2", "tp=2 pp=2"])
def test_context_parallel_with_samples_shorter_than_2cp(results, layout):
    """Samples of 1, 2, 3 tokens (< 2*cp: one rank holds only padding of them) and lengths not divisible by 2*cp
    or, under sequence parallelism, by tp: the same finite loss and gradient norm as one process."""
    reference, got = results["1 process"]["short_samples"], results[layout]["short_samples"]
    assert got["sequences"] == reference["sequences"] == 10
    assert math.isfinite(got["loss"]) and math.isfinite(got["grad_norm"])
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


def test_skipalign_with_zero_skips_is_contiguous(results):
    """On the first step's packs at the initial weights (query/key/value sharpened so that attention depends on
    positions; see distributed_checks.skipalign_check): skipalign_fraction=0 gives exactly the contiguous loss and
    gradient norm, and SkipAlign's differ. The same evaluation at the initial weights is exactly the first step."""
    for name, r in results.items():
        check, first_step = r["skipalign"], r["steps"][0]
        assert check["first_step"]["loss"] == first_step["loss"], name
        assert check["first_step"]["grad_norm"] == first_step["grad_norm"], name
        assert check["zero_skips"] == check["contiguous"], name
        assert check["skipalign"]["loss"] != pytest.approx(check["contiguous"]["loss"], rel=1e-4), name
        assert check["skipalign"]["grad_norm"] != pytest.approx(check["contiguous"]["grad_norm"], rel=1e-2), name


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "1 process"])
def test_skipalign_does_not_depend_on_layout(results, layout):
    """SkipAlign positions (drawn per pack, seed and epoch; split per sample by CP) give the one-process loss and
    gradient norm."""
    reference, got = results["1 process"]["skipalign"]["skipalign"], results[layout]["skipalign"]["skipalign"]
    assert math.isfinite(got["loss"]) and math.isfinite(got["grad_norm"])
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "1 process"])
def test_preference_objectives_do_not_depend_on_layout(results, layout):
    """dpo (shared and duplicated prompt) and logo (LOGO positions) on preference groups: the per-response sums
    reduced over CP with their gradients give the one-process loss and gradient norm at every layout."""
    reference, got = results["1 process"]["preference"], results[layout]["preference"]
    assert set(got) == set(reference)
    for key, ref in reference.items():
        assert math.isfinite(got[key]["loss"]) and math.isfinite(got[key]["grad_norm"]), key
        assert got[key]["loss"] == pytest.approx(ref["loss"], rel=1e-5), key
        assert got[key]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), key


def test_shared_prompt_equals_duplicated_prompt_at_every_layout(results):
    for name, r in results.items():
        check = r["preference"]
        for a, b in (("dpo shared", "dpo duplicate"), ("simpo logo shared", "simpo logo duplicate")):
            assert check[a]["loss"] == pytest.approx(check[b]["loss"], rel=1e-5), (name, a)
            assert check[a]["grad_norm"] == pytest.approx(check[b]["grad_norm"], rel=1e-5), (name, a)
        # LOGO's positions change the loss (attention depends on positions after sharpening)
        assert check["logo shared"]["loss"] != pytest.approx(check["logo contiguous"]["loss"], rel=1e-4), name
