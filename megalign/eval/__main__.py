"""python -m megalign.eval --model DIR --backend hf|vllm|openai --tasks needle,ruler-synthetic --out DIR

--model: a Hugging Face model directory, or a megalign checkpoint (exported to OUT/model-hf first; a run's
checkpoint directory means its newest; megalign/eval/models.py); with --backend openai, the served model's name
(and --base-url, --tokenizer for counting tokens). Writes OUT/items.jsonl (one line per item, as it finishes: a
rerun continues), OUT/results.json and OUT/results.md, and for the needle grid OUT/needle.png and OUT/needle.json.

  --all-checkpoints   every checkpoint of the run's checkpoint directory --model, each into OUT/step_N/, and
                      OUT/checkpoints.md comparing them (a rerun evaluates only what is new or unfinished)
  --compare A B ...   no evaluation: the results of finished runs side by side (megalign/eval/compare.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from megalign.cli import Parser
from megalign.errors import OptionError


def _claim(out: Path, fingerprint: dict, settings: dict) -> None:
    """OUT belongs to one model and one set of task settings: a rerun with the same continues, another is refused
    (its cached items would be the wrong model's answers)."""
    path = out / "evaluation.json"
    mine = {"fingerprint": fingerprint, "settings": settings}
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            what = "of another model" if theirs.get("fingerprint") != fingerprint else "with other settings"
            raise OptionError("out", f"{out} holds an evaluation {what} ({path}); give a new --out (or remove it "
                                     "to start over)")
        return
    path.write_text(json.dumps(mine, indent=1) + "\n")


def run(args) -> dict:
    from megalign.data.tokenizer import load_tokenizer
    from megalign.eval import backends, tasks
    from megalign.eval.prompting import PromptRenderer
    from megalign.eval.run import evaluate, summarize, write_results

    from megalign.eval.models import fingerprint, hf_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model_dir = None  # the served model (openai) has no directory here
    if args.backend == "openai":
        if not (args.base_url and args.tokenizer and args.max_length):
            raise OptionError("backend", "openai needs --base-url, --tokenizer (to count tokens) and --max-length")
        from megalign.eval.openai_client import OpenAIClient

        client = OpenAIClient(args.base_url, args.model, concurrency=args.concurrency)
        client.check()
        tokenizer = load_tokenizer(args.tokenizer)
        generator = backends.OpenAIBackend(client)
        max_length = args.max_length
    else:
        source = hf_model(args.model, out, args.tokenizer)
        model_dir = source.hf_dir
        tokenizer = load_tokenizer(args.tokenizer or source.tokenizer or model_dir)
        template = args.chat_template or source.chat_template or ("hf" if tokenizer.chat_template else None)
        if template is None:
            raise OptionError("chat_template", "is needed: the tokenizer has no chat_template of its own "
                                               "(give the one the model was trained with, e.g. llama2, chatml)")
        renderer = PromptRenderer(tokenizer, template)
        config = json.loads((model_dir / "config.json").read_text())
        max_length = args.max_length or config.get("max_position_embeddings")
    opts = tasks.TaskOptions(max_length=max_length, seed=args.seed, needle_lengths=args.needle_lengths,
                             needle_depths=args.needle_depths, haystack_files=tuple(args.haystack or ()),
                             ruler_samples=args.ruler_samples, longbench_dir=args.longbench_dir,
                             longbench_data_dir=args.longbench_data_dir,
                             longbench_tasks=tuple(args.longbench_tasks or ()), longbench_budget=args.longbench_budget,
                             longbench_v2_dir=args.longbench_v2_dir, longbench_v2_data=args.longbench_v2_data,
                             longalign_dir=args.longalign_dir)
    judge = None
    if "longbench-chat" in names:
        if not (args.judge_model and args.judge_base_url):
            raise OptionError("judge_model", "and --judge-base-url are needed for --tasks longbench-chat (any "
                                             "OpenAI-compatible model; LongAlign used GPT-4)")
        from megalign.eval.longbench_chat import Judge
        from megalign.eval.openai_client import OpenAIClient

        judge_client = OpenAIClient(args.judge_base_url, args.judge_model, api_key_env=args.judge_api_key_env)
        judge_client.check()
        judge = Judge(judge_client, args.longalign_dir, protocol=args.judge_protocol, seed=args.seed)
    _claim(out, fingerprint(model_dir, args.model),
           {"backend": args.backend, "tasks": names,
            "chat_template": args.chat_template if args.backend == "openai" else template, "options": repr(opts),
            "judge": [args.judge_model, args.judge_protocol] if judge else None})
    items = tasks.make_items(names, tokenizer, opts)  # bad task inputs fail here, before a model is loaded
    if args.backend == "hf":
        generator = backends.HFBackend(model_dir, renderer, device=args.device)
    elif args.backend == "vllm":
        generator = backends.VLLMBackend(model_dir, renderer, tensor_parallel=args.tensor_parallel,
                                         max_model_len=max_length)
    scored = evaluate(items, generator.generate, tasks.scorer(judge), out, progress=not args.no_progress)
    per_task = summarize(scored.records)
    if any(n in ("longbench", "longbench-e") for n in names):
        from megalign.eval import longbench

        per_task["longbench averages"] = longbench.summary(scored.records)
    if any(n.startswith("longbench-v2") for n in names):
        from megalign.eval import longbench_v2

        per_task["longbench-v2 table"] = longbench_v2.summary(scored.records)
    if "needle" in names:
        from megalign.eval.needle import heatmap

        grid = heatmap([r for r in scored.records if r["task"] == "needle"], out / "needle.png")
        (out / "needle.json").write_text(json.dumps(grid, indent=1) + "\n")
    settings = {"model": args.model, "backend": args.backend, "tasks": names, "max_length": max_length,
                "seed": args.seed, "generated": scored.generated}
    json_path, md_path = write_results(out, per_task, settings)
    for name, t in per_task.items():
        if "score" in t:
            print(f"{name}: {t['score']} ({t['scored']} scored, {t['failed']} failed)")
    print(f"results: {json_path}, {md_path}; items: {out / 'items.jsonl'}"
          + (f"; heatmap: {out / 'needle.png'}" if "needle" in names else ""))
    return per_task


def run_all_checkpoints(args) -> dict:
    """Each checkpoint of the run into OUT/step_N (each resumable as one evaluation), then their comparison."""
    import copy

    from megalign.eval.compare import compare
    from megalign.eval.models import checkpoints_of

    if args.backend == "openai":
        raise OptionError("all_checkpoints", "evaluates checkpoints with --backend hf or vllm; a served model is one")
    out = Path(args.out)
    done = {}
    for checkpoint in checkpoints_of(args.model):
        print(f"== {checkpoint}")
        one = copy.copy(args)
        one.model, one.out = str(checkpoint), str(out / checkpoint.name)
        done[checkpoint.name] = run(one)
    table = compare([out / name for name in done])
    (out / "checkpoints.md").write_text(table)
    print(table + f"comparison: {out / 'checkpoints.md'}")
    return done


def parser() -> Parser:
    p = Parser(prog="python -m megalign.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", nargs="+", metavar="OUT",
                   help="print finished evaluations side by side (and write --out FILE.md if given); no --model")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="--model is a run's checkpoint directory: evaluate each checkpoint into OUT/step_N")
    p.add_argument("--model")
    p.add_argument("--backend", choices=("hf", "vllm", "openai"), default="hf")
    p.add_argument("--tasks", help="comma-separated: needle, ruler-synthetic, longbench, longbench-e, longbench-v2, "
                                    "longbench-v2-no-context, longbench-chat")
    p.add_argument("--out")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's)")
    p.add_argument("--chat-template", help="the template the model was trained with (default: the tokenizer's own)")
    p.add_argument("--max-length", type=int, help="the longest context (default: the model's window)")
    p.add_argument("--base-url", help="--backend openai: the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=8, help="--backend openai: requests in flight")
    p.add_argument("--tensor-parallel", type=int, default=1, help="--backend vllm")
    p.add_argument("--device", default="auto", help="--backend hf: cpu, cuda or auto")
    p.add_argument("--haystack", nargs="+", help="needle: text files for the haystack (default: synthetic)")
    p.add_argument("--needle-lengths", type=int, default=10)
    p.add_argument("--needle-depths", type=int, default=10)
    p.add_argument("--ruler-samples", type=int, default=20)
    p.add_argument("--longbench-dir", help="longbench: your LongBench checkout (its config/ and data/)")
    p.add_argument("--longbench-data-dir", help="longbench: the data JSONL files, if not in the checkout's data/")
    p.add_argument("--longbench-tasks", nargs="+", help="longbench: a subset of the 21 tasks")
    p.add_argument("--longbench-budget", type=int,
                   help="longbench, longbench-v2: prompt tokens kept by the middle truncation (default: --max-length "
                        "- 500; the official v2 runs of 128k models keep 120000)")
    p.add_argument("--longbench-v2-dir", help="longbench-v2: your LongBench checkout's root (its prompts/)")
    p.add_argument("--longbench-v2-data", help="longbench-v2: its data.json, if not in --longbench-v2-dir")
    p.add_argument("--longalign-dir", help="longbench-chat: your LongAlign checkout (its LongBench_Chat/)")
    p.add_argument("--judge-model", help="longbench-chat: the judge's model name on --judge-base-url")
    p.add_argument("--judge-base-url", help="longbench-chat: an OpenAI-compatible server")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="the judge's API key variable")
    p.add_argument("--judge-protocol", choices=("paper", "released"), default="paper",
                   help="paper: examples shuffled, two passes averaged; released: LongAlign's script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def check_required(p: Parser, args) -> None:
    for option in ("model", "tasks", "out"):
        if getattr(args, option) is None:
            p.error(f"--{option} is required (or --compare OUT ...)")


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.compare:
        p.call(_print_comparison, args)
        return
    check_required(p, args)
    p.call(run_all_checkpoints if args.all_checkpoints else run, args)


def _print_comparison(args) -> None:
    from megalign.eval.compare import compare

    table = compare(args.compare)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")


if __name__ == "__main__":
    main()
