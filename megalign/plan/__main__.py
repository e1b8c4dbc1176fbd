"""`python -m megalign.plan` / `megalign-plan` / tools/plan.py: which layouts fit a model, its data and a cluster.

  python -m megalign.plan --preset llama2-7b --seq-length 65536 model.max_position_embeddings=65536 \
      --gpu h100-80g --nodes 2
  python -m megalign.plan --config examples/longalign-llama2-7b-64k.yaml --data runs/data/packed --gpu a800-80g \
      --nodes 4 --json
"""

from __future__ import annotations

import json
import sys

from megalign.cli import Parser
from megalign.config import RECOMPUTE
from megalign.plan.hardware import GPUS


def parser() -> Parser:
    p = Parser(prog="megalign-plan", description="Per-GPU memory and modelled step time of every TP/PP/CP/DP x "
               "recompute layout of a cluster: the ones that fit, best first, and why each other one fails.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help="a model preset (megalign/model/presets.py), e.g. llama2-7b")
    model.add_argument("--hf-config", help="a Hugging Face model directory or its config.json")
    model.add_argument("--config", help="a megalign config YAML (its model, parallel and training keys)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.recompute=full "
                   "model.max_position_embeddings=65536 parallel.distributed_optimizer=false")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a dataset PREFIX (tools/preprocess_data.py): its pack length and lengths")
    data.add_argument("--seq-length", type=int, help="tokens per pack (packs of one sample)")
    p.add_argument("--gpu", default="h100-80g", help=f"one of {', '.join(GPUS)} (default h100-80g)")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU instead of the catalogue's")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, help="packs per optimizer step (default: training.global_batch)")
    p.add_argument("--recompute", default=",".join(RECOMPUTE), help="the recompute modes to weigh, comma-separated "
                   f"(default {','.join(RECOMPUTE)})")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept free for the CUDA "
                   "context, NCCL and fragmentation (default 0.1)")
    p.add_argument("--top", type=int, default=10, help="how many fitting layouts to list (0: all)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args) -> str:
    from megalign.plan.hardware import gpu
    from megalign.plan.inputs import load_plan_config, load_workload, resolved
    from megalign.plan.planner import plan
    from megalign.plan.report import as_json, table

    cfg = load_plan_config(args.preset, args.hf_config, args.config, args.overrides)
    workload = load_workload(cfg, args.data, args.seq_length)
    cfg = resolved(cfg, workload)
    chosen = gpu(args.gpu, args.gpu_memory)
    recompute = tuple(r.strip() for r in args.recompute.split(",") if r.strip())
    result = plan(cfg, workload, chosen, args.nodes, args.gpus_per_node, args.global_batch, recompute, args.mfu,
                  args.headroom)
    name = args.preset or args.hf_config or args.config
    if args.json:
        return json.dumps(as_json(result, name, args.top), indent=2)
    return table(result, name, args.top)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    print(p.call(run, args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
