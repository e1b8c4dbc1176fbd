"""A plan as a table (fitting layouts best first, then the excluded ones with their reasons) or as JSON."""

from __future__ import annotations

from megalign.model.arithmetic import parameter_count
from megalign.plan.hardware import GIB
from megalign.plan.planner import Assessment, Plan

ATTENTION = {"flash": "FlashAttention-style kernels, all-gather CP", "te": "TransformerEngine, ring CP",
             "cpu": "the CPU mode's sdpa"}


ROW = "{:>3}  {:>2} {:>2} {:>2} {:>3} {:<3} {:<10} {:>7}  {:>6} {:>6} {:>5} {:>6} {:>6} {:>8} {:>13}"


def _gib(x: float) -> float:
    return round(x / GIB, 2)


def header(plan: Plan, model_name: str) -> list[str]:
    m, w, g = plan.cfg.model, plan.workload, plan.gpu
    params = parameter_count(m, m.padded_vocab_size)
    return [
        f"model: {model_name}, {params / 1e9:.2f}B parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads / {m.query_groups} KV groups, vocabulary {m.vocab_size:,})",
        f"data: {w.source}; global batch {plan.global_batch} packs",
        f"cluster: {plan.nodes} x {plan.gpus_per_node} {g.name} ({g.memory_gib:.1f} GiB, "
        f"{plan.usable_bytes / GIB:.1f} usable with {plan.headroom:.0%} headroom)",
        f"assumed: {plan.precision.name}, {ATTENTION[plan.attention]}, "
        f"{'distributed' if plan.cfg.parallel.distributed_optimizer else 'replicated'} optimizer, "
        f"MFU {plan.mfu:.2f}; step times rank layouts, they are not measurements",
    ]


def table(plan: Plan, model_name: str, top: int = 10) -> str:
    lines = header(plan, model_name) + [""]
    shown = plan.fitting[:top] if top > 0 else plan.fitting
    lines.append(f"{len(plan.fitting)} layouts fit" + (f", the best {len(shown)}:" if shown else "."))
    if shown:
        lines.append("GiB per GPU = state (weights, gradients, optimizer, buffers) + activations + gathered K/V + "
                     "logits + backward transients, on the fullest pipeline stage")
        lines.append(ROW.format("#", "tp", "pp", "cp", "dp", "sp", "recompute", "GiB/GPU", "state", "activ", "K/V",
                                "logits", "trans", "step s", "tokens/s/GPU"))
        for i, a in enumerate(shown, 1):
            lay, mem, t = a.layout, a.memory, a.time
            gib = [f"{x / GIB:.1f}" for x in (mem.total, mem.model_state, mem.activations, mem.kv_gather, mem.logits,
                                              mem.transient)]
            lines.append(ROW.format(i, lay.tp, lay.pp, lay.cp, lay.dp, "on" if lay.sp else "off", lay.recompute, *gib,
                                    f"{t.total:.2f}", f"{t.tokens_per_second_per_gpu(plan.world):,.0f}"))
    groups = excluded_groups(plan.excluded)
    lines += ["", f"{len(plan.excluded)} layouts excluded:" if groups else "no layout excluded."]
    lines += [f"  {label}: {reason}" for label, reason in groups]
    return "\n".join(lines)


def excluded_groups(excluded: list[Assessment]) -> list[tuple[str, str]]:
    """(label, reason) lines: the recompute modes of one layout that fail for the same reason share a line."""
    groups: dict[tuple, list[str]] = {}
    for a in excluded:
        lay = a.layout
        key = (lay.tp, lay.pp, lay.cp, lay.dp, lay.sp, a.reason)
        groups.setdefault(key, []).append(lay.recompute)
    lines = []
    for (tp, pp, cp, dp, sp, reason), modes in groups.items():
        lines.append((f"tp{tp} pp{pp} cp{cp} dp{dp}{' sp' if sp else ''} {'/'.join(modes)}", reason))
    return lines


def as_json(plan: Plan, model_name: str, top: int = 10) -> dict:
    m = plan.cfg.model

    def layout(a: Assessment) -> dict:
        lay = a.layout
        return {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp, "sp": lay.sp, "recompute": lay.recompute}

    def memory(a: Assessment) -> dict:
        mem = a.memory
        return {"stage": mem.stage, "total_gib": _gib(mem.total), "model_state_gib": _gib(mem.model_state),
                "step_gib": _gib(mem.step), **{f"{k}_gib": _gib(v) for k, v in mem.terms().items()}}

    shown = plan.fitting[:top] if top > 0 else plan.fitting
    return {
        "model": {"name": model_name, "parameters": parameter_count(m, m.padded_vocab_size),
                  "num_layers": m.num_layers, "hidden_size": m.hidden_size, "vocab_size": m.vocab_size},
        "workload": {"source": plan.workload.source, "seq_length": plan.workload.seq_length,
                     "mean_pack_tokens": plan.workload.mean_pack_tokens, "global_batch": plan.global_batch},
        "cluster": {"gpu": plan.gpu.name, "memory_gib": plan.gpu.memory_gib, "nodes": plan.nodes,
                    "gpus_per_node": plan.gpus_per_node, "usable_gib": _gib(plan.usable_bytes)},
        "assumptions": {"precision": plan.precision.name, "attention": plan.attention, "mfu": plan.mfu,
                        "headroom": plan.headroom,
                        "distributed_optimizer": plan.cfg.parallel.distributed_optimizer},
        "fitting": [{**layout(a), "memory": memory(a),
                     "step_seconds": {"total": a.time.total, "compute": a.time.compute, "tp": a.time.tp,
                                      "cp": a.time.cp, "pp": a.time.pp, "dp": a.time.dp},
                     "tokens_per_second_per_gpu": a.time.tokens_per_second_per_gpu(plan.world)} for a in shown],
        "excluded": [{**layout(a), "reason": a.reason, **({"memory": memory(a)} if a.memory else {})}
                     for a in plan.excluded],
    }
