"""python -m megalign.eval --model DIR --backend hf|vllm|openai --tasks needle,ruler-synthetic --out DIR

--model: a Hugging Face model directory, or a megalign checkpoint (exported to OUT/model-hf first; a run's
checkpoint directory means its newest); with --backend openai, the served model's name (and --base-url,
--tokenizer for counting tokens). Writes OUT/items.jsonl (one line per item, as it finishes: a rerun continues),
OUT/results.json and OUT/results.md, and for the needle grid OUT/needle.png and OUT/needle.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from megalign.cli import Parser
from megalign.errors import MegalignError, OptionError


def _hf_dir(model: str, out: Path, tokenizer: str | None) -> Path:
    """A directory transformers loads: `model` itself, or its export when it is a megalign checkpoint."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise OptionError("model", f"{model}: no such directory")
    from megalign.checkpoint.store import MANIFEST, TRACKER

    if not ((path / MANIFEST).is_file() or (path / TRACKER).is_file() or any(path.glob("step_*"))):
        raise OptionError("model", f"{model} is neither a Hugging Face model (no config.json) nor a megalign "
                                   "checkpoint (no megalign.json, no step_* directories)")
    from megalign.convert.convert import export_hf

    target = out / "model-hf"
    stamp = target / ".megalign-source.json"
    source = {"checkpoint": str(path.resolve()), "mtime": max(p.stat().st_mtime for p in path.rglob("*"))}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == source):
        export_hf(path, target, tokenizer=tokenizer, overwrite=True)
        stamp.write_text(json.dumps(source))
    return target


def run(args) -> dict:
    from megalign.data.tokenizer import load_tokenizer
    from megalign.eval import backends, tasks
    from megalign.eval.prompting import PromptRenderer
    from megalign.eval.run import evaluate, summarize, write_results

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
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
        model_dir = _hf_dir(args.model, out, args.tokenizer)
        tokenizer = load_tokenizer(args.tokenizer or model_dir)
        template = args.chat_template or ("hf" if tokenizer.chat_template else None)
        if template is None:
            raise OptionError("chat_template", "is needed: the tokenizer has no chat_template of its own "
                                               "(give the one the model was trained with, e.g. llama2, chatml)")
        renderer = PromptRenderer(tokenizer, template)
        config = json.loads((model_dir / "config.json").read_text())
        max_length = args.max_length or config.get("max_position_embeddings")
        if args.backend == "hf":
            generator = backends.HFBackend(model_dir, renderer, device=args.device)
        else:
            generator = backends.VLLMBackend(model_dir, renderer, tensor_parallel=args.tensor_parallel,
                                             max_model_len=max_length)
    opts = tasks.TaskOptions(max_length=max_length, seed=args.seed, needle_lengths=args.needle_lengths,
                             needle_depths=args.needle_depths, haystack_files=tuple(args.haystack or ()),
                             ruler_samples=args.ruler_samples)
    items = tasks.make_items(names, tokenizer, opts)
    scored = evaluate(items, generator.generate, tasks.score, out, progress=not args.no_progress)
    per_task = summarize(scored.records)
    if "needle" in names:
        from megalign.eval.needle import heatmap

        grid = heatmap([r for r in scored.records if r["task"] == "needle"], out / "needle.png")
        (out / "needle.json").write_text(json.dumps(grid, indent=1) + "\n")
    settings = {"model": args.model, "backend": args.backend, "tasks": names, "max_length": max_length,
                "seed": args.seed, "generated": scored.generated}
    json_path, md_path = write_results(out, per_task, settings)
    for name, t in per_task.items():
        print(f"{name}: {t['score']} ({t['scored']} scored, {t['failed']} failed)")
    print(f"results: {json_path}, {md_path}; items: {out / 'items.jsonl'}"
          + (f"; heatmap: {out / 'needle.png'}" if "needle" in names else ""))
    return per_task


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m megalign.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=("hf", "vllm", "openai"), default="hf")
    p.add_argument("--tasks", required=True, help="comma-separated: needle, ruler-synthetic")
    p.add_argument("--out", required=True)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    p.call(run, args)


if __name__ == "__main__":
    try:
        main()
    except MegalignError as e:  # raised outside Parser.call (none expected); one line all the same
        raise SystemExit(f"error: {e}")
