"""Generation throughput of the `hf` evaluation backend, and the wall time of a needle grid.

The example model (examples/tiny.yaml's shape: 4 layers, hidden 128, 4 heads, 2 KV groups) as a Hugging Face
Llama with random weights and the example BPE tokenizer; prompts of 1k / 4k / 16k tokens through
megalign.eval.backends.HFBackend (greedy, chatml template), each length repeated and alternated; prefill
tokens/s from a 1-token generation, decode tokens/s from the extra time of N more tokens (the model never stops
early: eos is unset for the timing). Then a needle grid (lengths x depths) end to end with megalign.eval.run.

    python bench/eval_generation.py [--lengths 1024 4096 16384] [--new-tokens 64] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import code_state  # noqa: E402


def build_model(workdir: Path, max_positions: int) -> Path:
    import torch
    import transformers

    from megalign.data import synthetic
    from megalign.data.tokenizer_training import train_bpe_tokenizer

    tok = train_bpe_tokenizer(synthetic.corpus(0), workdir / "model", vocab_size=8000)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8064, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions)
    transformers.LlamaForCausalLM(config).save_pretrained(tok)
    return Path(tok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--needle-grid", type=int, nargs=2, default=[10, 10], metavar=("LENGTHS", "DEPTHS"))
    p.add_argument("--needle-max-length", type=int, default=4096)
    args = p.parse_args()
    import torch

    from megalign.data.tokenizer import load_tokenizer
    from megalign.eval import tasks
    from megalign.eval.backends import HFBackend
    from megalign.eval.items import EvalItem
    from megalign.eval.prompting import PromptRenderer
    from megalign.eval.run import evaluate

    print(code_state())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), max(args.lengths) + args.new_tokens + 64)
        tokenizer = load_tokenizer(model_dir)
        renderer = PromptRenderer(tokenizer, "chatml")
        renderer.stop_ids = []  # timing: never stop early
        backend = HFBackend(model_dir, renderer, device=args.device)
        backend.model.generation_config.eos_token_id = None
        filler = " ".join(["the grass is green and the sky is blue"] * (max(args.lengths) // 4))
        ids = tokenizer.encode_batch([filler])[0]
        prompts = {n: tokenizer.decode(ids[:n - 16]) for n in args.lengths}
        times = {(n, k): [] for n in args.lengths for k in (1, args.new_tokens)}
        backend.generate(EvalItem("warm", "warm", prompts[args.lengths[0]], [], 2))
        for _ in range(args.repeats):
            for n in args.lengths:
                for k in (1, args.new_tokens):
                    item = EvalItem("bench", f"{n}-{k}", prompts[n], [], k)
                    started = time.perf_counter()
                    out = backend.generate(item)
                    times[(n, k)].append(time.perf_counter() - started)
                    assert out.new_tokens == k, (out.new_tokens, k)
        print(f"\n| prompt tokens | prefill s | prefill tok/s | {args.new_tokens} new tokens s | decode tok/s |")
        print("|---|---|---|---|---|")
        for n in args.lengths:
            prefill = statistics.median(times[(n, 1)])
            full = statistics.median(times[(n, args.new_tokens)])
            decode = (args.new_tokens - 1) / max(full - prefill, 1e-9)
            print(f"| {len(renderer.prompt_ids(EvalItem('b', 'b', prompts[n], [], 1)))} | {prefill:.3f} | "
                  f"{n / prefill:,.0f} | {full:.3f} | {decode:,.0f} |")

        renderer.stop_ids = PromptRenderer(tokenizer, "chatml").stop_ids
        n_lengths, n_depths = args.needle_grid
        opts = tasks.TaskOptions(max_length=args.needle_max_length, needle_lengths=n_lengths, needle_depths=n_depths)
        started = time.perf_counter()
        items = tasks.make_items(["needle"], tokenizer, opts)
        built = time.perf_counter() - started
        scored = evaluate(items, backend.generate, tasks.score, Path(tmp) / "eval", progress=False)
        total = time.perf_counter() - started
        print(f"\nneedle grid {n_lengths} x {n_depths} up to {args.needle_max_length} tokens: {len(items)} items, "
              f"built in {built:.1f} s, evaluated in {total:.1f} s in all "
              f"({sum(r.get('new_tokens') or 0 for r in scored.records)} tokens generated)")


if __name__ == "__main__":
    main()
