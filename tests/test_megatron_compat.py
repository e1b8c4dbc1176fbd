"""Canaries for megalign/megatron_compat.py: each test pins the upstream behaviour one workaround relies on, or the
upstream bug it works around. A failure here after upgrading megatron-core (or torch) names the entry to revisit:
the workaround may be dead (the bug is fixed, the warning gone) or wrong (the behaviour it relies on changed)."""

import inspect
import re
from pathlib import Path

import pytest
import torch

from megalign import megatron_compat
from megalign.config import Config, resolve, updated

TINY = {"num_layers": 1, "hidden_size": 16, "ffn_hidden_size": 32, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def world():
    """One in-process megatron world (gloo, TP=1, the CPU mode without CUDA), shut down after this module."""
    from megatron.core import parallel_state

    from megalign.parallel.setup import initialize, shutdown

    cfg = resolve(updated(Config(), model=TINY), 128)
    if parallel_state.model_parallel_is_initialized():
        yield cfg
        return
    initialize(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    yield cfg
    shutdown()


# -- 1. warning filters ----------------------------------------------------------------------------------------
def _sources(package: str) -> list[Path]:
    import importlib.util

    root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    return list(root.rglob("*.py")) + ([root / "lib" / "libtorch_python.so"] if package == "torch" else [])


def test_every_filtered_warning_is_still_raised_somewhere_upstream():
    """A filter for a message nobody emits any more is dead: remove it from KNOWN_WARNINGS."""
    texts = {}
    for _, package in megatron_compat.KNOWN_WARNINGS:
        if package not in texts:
            texts[package] = [p.read_bytes() for p in _sources(package) if p.is_file()]
    for message, package in megatron_compat.KNOWN_WARNINGS:
        pattern = re.compile(message.encode())
        assert any(pattern.search(t) for t in texts[package]), f"{message!r} no longer in {package}"


# -- 2. the distributed optimizer's checkpoint load -----------------------------------------------------------
def _model_and_optimizer(cfg):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megalign.model.build import build_model

    model = build_model(cfg, "sdpa", torch.float32)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                       params_dtype=torch.float32), [ddp])
    return model, ddp, optimizer


def _single(optimizer):
    return optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") else optimizer


def test_distributed_optimizer_load_still_needs_the_step_workaround(world, tmp_path):
    from megatron.core import dist_checkpointing

    from megalign.checkpoint.state import OPTIMIZER_METADATA

    model, ddp, optimizer = _model_and_optimizer(world)
    for p in ddp.parameters():
        p.main_grad.copy_(torch.randn_like(p))
    optimizer.step()
    optimizer.step()
    saved = {id_: {k: v.clone() for k, v in s.items()} for id_, s in enumerate(_single(optimizer).optimizer.state.values())}
    state = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False, metadata=OPTIMIZER_METADATA)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save({"optimizer": state}, str(tmp_path / "ckpt"))

    def fresh_load():
        model2, _, optimizer2 = _model_and_optimizer(world)
        megatron_compat.prepare_optimizer_for_loading(optimizer2)
        template = optimizer2.sharded_state_dict(model2.sharded_state_dict(), is_loading=True,
                                                 metadata=OPTIMIZER_METADATA)
        return optimizer2, dist_checkpointing.load({"optimizer": template}, str(tmp_path / "ckpt"))["optimizer"]

    # megatron's own path: the groups' load leaves ONE step tensor shared by every parameter, then the
    # fully reshardable loader raises KeyError 'step'
    optimizer2, loaded = fresh_load()
    part = dict(loaded)
    param_state = part.pop("param_state")
    part.pop("param_state_sharding_type")
    opt = _single(optimizer2)
    opt.load_state_dict(part)
    steps = [s["step"] for s in opt.optimizer.state.values()]
    assert len({id(s) for s in steps}) == 1, "megatron no longer shares one step tensor: revisit entry 2"
    with pytest.raises(KeyError, match="step"):  # fixed upstream if this fails: revisit entry 2
        opt.load_parameter_state_from_fully_reshardable(param_state)

    # the workaround: every parameter's own step, and the moments as saved
    optimizer3, loaded = fresh_load()
    megatron_compat.load_optimizer_state(optimizer3, loaded)
    restored = list(_single(optimizer3).optimizer.state.values())
    assert len({id(s["step"]) for s in restored}) == len(restored)
    for i, s in enumerate(restored):
        assert float(s["step"]) == float(saved[i]["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], saved[i][key]), key


# -- 3. the LR schedule of a resumed run ----------------------------------------------------------------------
def test_scheduler_override_alone_still_asserts(world):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    _, _, optimizer = _model_and_optimizer(world)
    common = dict(init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=1, lr_decay_steps=10, lr_decay_style="cosine",
                  start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant")
    with pytest.raises(AssertionError):  # override_opt_param_scheduler alone: both flags are needed (entry 3)
        OptimizerParamScheduler(optimizer, override_opt_param_scheduler=True, **common)
    scheduler = OptimizerParamScheduler(optimizer, **common, **megatron_compat.SCHEDULER_FOLLOWS_CONFIG)
    other = OptimizerParamScheduler(optimizer, **{**common, "lr_decay_steps": 99},
                                    **megatron_compat.SCHEDULER_FOLLOWS_CONFIG)
    other.load_state_dict(scheduler.state_dict())
    assert other.lr_decay_steps == 99  # the config's schedule, not the checkpoint's


# -- 4. YaRN attention scaling through the MLA fields ----------------------------------------------------------
def test_megatron_attention_still_reads_the_yarn_concentration_factor(world):
    from megatron.core.transformer.attention import Attention

    from megalign.model.build import transformer_config

    assert "_yarn_get_concentration_factor_from_config(self.config)" in inspect.getsource(Attention.forward)
    config = transformer_config(world, torch.float32)
    megatron_compat.set_rope_attention_scaling(config, 1.2079441541679836)  # asserts megatron reads it back


# -- 5. checkpoint load errors --------------------------------------------------------------------------------
def test_checkpoint_exception_is_still_not_an_exception():
    (error,) = megatron_compat.CHECKPOINT_LOAD_ERRORS
    assert issubclass(error, BaseException) and not issubclass(error, Exception)


# -- 6. GPTModel._preprocess and megatron's THD RoPE -----------------------------------------------------------
def test_gpt_model_preprocess_keeps_the_signature_and_output_megalign_overrides():
    from megatron.core.models.gpt import GPTModel

    params = list(inspect.signature(GPTModel._preprocess).parameters)
    assert params == ["self", "input_ids", "position_ids", "decoder_input", "inference_context", "packed_seq_params",
                      "padding_mask"]
    source = inspect.getsource(GPTModel._preprocess)
    assert re.search(r"preproc_output = \(\s*decoder_input,\s*rotary_pos_emb,", source)  # rotary at index 1


def test_gpt_model_still_computes_its_loss_through_the_method_megalign_overrides():
    from megatron.core.models.gpt import GPTModel

    assert list(inspect.signature(GPTModel.compute_language_model_loss).parameters) == ["self", "labels", "logits"]
    assert "self.compute_language_model_loss(labels, logits)" in inspect.getsource(GPTModel)  # model/gpt.py


def _rotate(x, angles):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cos(angles) + rotated * torch.sin(angles)


def test_thd_rope_reads_a_row_long_embedding_per_token_and_restarts_otherwise(world):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megalign.model.build import transformer_config

    config = transformer_config(world, torch.float32)
    lengths, dim = [3, 5], 4
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    t = torch.randn(8, 1, dim, generator=torch.Generator().manual_seed(0))
    inv_freq = torch.tensor([1.0, 0.1])

    def emb(positions):
        freqs = torch.tensor(positions, dtype=torch.float32)[:, None] * inv_freq
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]

    gapped = [0, 7, 9, 100, 101, 300, 301, 302]  # one angle per token of the row ("exact mapping")
    got = apply_rotary_pos_emb(t, emb(gapped), config=config, cu_seqlens=cu)
    assert torch.allclose(got, _rotate(t, emb(gapped)[:, 0]), atol=1e-6)
    restart = apply_rotary_pos_emb(t, emb(list(range(max(lengths)))), config=config, cu_seqlens=cu)
    per_sequence = [p for n in lengths for p in range(n)]  # a shorter embedding restarts at every sequence
    assert torch.allclose(restart, _rotate(t, emb(per_sequence)[:, 0]), atol=1e-6)


# -- 7. the local spec's core attention ------------------------------------------------------------------------
def test_megatron_dot_product_attention_still_refuses_packed_batches(world):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megalign.model.build import transformer_config

    attention = DotProductAttention(transformer_config(world, torch.float32), 1, AttnMaskType.causal, "self")
    q = torch.randn(4, 1, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(AssertionError):  # if megatron takes THD itself now, model/attention.py may be simpler
        attention(q, q, q, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                                   cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4))


# -- 8. TransformerConfig rules and megatron's init ------------------------------------------------------------
def test_variable_seq_lengths_still_needs_the_alltoall_dispatcher():
    from megatron.core.transformer.transformer_config import TransformerConfig

    with pytest.raises(Exception, match="alltoall|dispatcher"):
        TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, variable_seq_lengths=True)


def test_skipping_megatrons_init_still_leaves_tensor_parallel_attributes_unset(world):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from megalign.model.build import transformer_config

    def layer(perform: bool):
        config = transformer_config(world, torch.float32, random_init=perform)
        return ColumnParallelLinear(16, 32, config=config, init_method=torch.nn.init.zeros_, bias=False)

    assert getattr(layer(True).weight, "tensor_model_parallel", False)
    assert not getattr(layer(False).weight, "tensor_model_parallel", False)  # so model/init.py must redraw


# -- 9. TE parameter names ------------------------------------------------------------------------------------
def test_te_spec_names_its_fused_norm_layer_norm_weight(world):
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("TransformerEngine's modules need CUDA")
    from megalign.model.build import build_model

    names = [n for n, _ in build_model(world, "te", torch.bfloat16).named_parameters()]
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names), names


# -- 10. the schedule divides the loss in place ----------------------------------------------------------------
def test_the_schedule_still_divides_the_returned_loss_in_place():
    from megatron.core.pipeline_parallel import schedules

    assert "output_tensor /= " in inspect.getsource(schedules)  # weighted_loss reports a copy


# -- 12. the checkpoint writer's Manager process -----------------------------------------------------------------
def test_megatron_still_keeps_its_results_queue_in_the_module_global():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    source = inspect.getsource(filesystem_async._get_write_results_queue)
    assert "global _results_queue" in source and "Manager()" in source  # what entry 12 pre-empts


def test_the_results_queue_manager_dies_with_a_killed_trainer(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "trainer.py"
    script.write_text("import sys, time\n"
                      "from megalign import megatron_compat\n"
                      "if __name__ == '__main__':\n"
                      "    manager = megatron_compat.results_queue_that_dies_with_the_trainer()\n"
                      "    print(manager._process.pid, flush=True)\n"
                      "    time.sleep(60)\n")
    root = Path(__file__).resolve().parents[1]
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(root)})
    manager_pid = int(trainer.stdout.readline())
    assert psutil.pid_exists(manager_pid)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(manager_pid) and psutil.Process(manager_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the Manager outlived the killed trainer"
        time.sleep(0.05)


# -- the list is the module's ---------------------------------------------------------------------------------
def test_the_module_lists_every_workaround_it_holds():
    doc = megatron_compat.__doc__
    for name in ("quiet_known_warnings", "load_optimizer_state", "SCHEDULER_FOLLOWS_CONFIG",
                 "set_rope_attention_scaling", "CHECKPOINT_LOAD_ERRORS", "results_queue_that_dies_with_the_trainer"):
        assert name in doc and hasattr(megatron_compat, name), name
    assert all(f"{i}." in doc for i in range(1, 13))
