#!/usr/bin/env python
"""Hugging Face safetensors <-> megalign checkpoints (Llama 2/3, Mistral, Qwen2, GLM-4).

  import  HF model directory -> megalign weights checkpoint (loads at any TP/PP/DP; train with
          checkpoint.init_from=OUT)
  export  megalign checkpoint (weights or training) -> HF model directory (safetensors + config.json +
          generation_config.json: the original's token ids, plus the end-of-turn token of a run's chat template)

Both write beside --out and replace an earlier --out (with --overwrite) only once the new output is complete.

Conversion runs in one CPU process and holds about one copy of the model in memory. See megalign/convert/.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Conversion is a CPU job (one process, the whole model): never touch the GPUs of the node it runs on.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from megalign.cli import Parser  # noqa: E402


def parser() -> Parser:
    p = Parser(prog="convert_checkpoint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    i = sub.add_parser("import", help="HF model directory -> megalign weights checkpoint")
    i.add_argument("--hf", required=True, metavar="DIR", help="HF model directory (config.json + safetensors)")
    i.add_argument("--out", required=True, metavar="ROOT", help="checkpoint root to write (ROOT/step_0000000, "
                   "ROOT/latest, ROOT/model.yaml, ROOT/hf/)")
    i.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="stored dtype (default auto: bf16 stays bf16, fp32 and fp16 are stored as fp32)")
    i.add_argument("--max-position-embeddings", type=int, metavar="N",
                   help="lower the model's context to N (e.g. to its sliding window, up to which full attention "
                        "is exact)")
    i.add_argument("--overwrite", action="store_true",
                   help="replace an earlier import at --out (kept until the new one is complete)")
    e = sub.add_parser("export", help="megalign checkpoint -> HF model directory")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint directory, or a root holding checkpoints (its newest)")
    e.add_argument("--out", required=True, metavar="DIR", help="HF model directory to write")
    e.add_argument("--architecture", default="auto",
                   choices=("auto", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GlmForCausalLM"),
                   help="default: the imported model's, else from the model (GLM: interleaved RoPE; Qwen2: q/k/v "
                        "bias only; else Llama)")
    e.add_argument("--hf-config", metavar="FILE|DIR",
                   help="the original config.json (e.g. IMPORT/hf): its architecture and token ids (and the "
                        "generation_config.json beside it) are kept; default: the ones recorded by the import")
    e.add_argument("--tokenizer", metavar="FILE|DIR", help="copy tokenizer files from here (e.g. IMPORT/hf)")
    e.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="dtype of the safetensors (default: the checkpoint's)")
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB; e.g. 500MB, 2GiB)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (kept until the new one is complete)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    from megalign.megatron_compat import quiet_known_warnings

    quiet_known_warnings()
    try:
        p.call(convert, args)
    finally:
        if "megatron.core" in sys.modules:  # a process group was started
            from megalign.parallel.setup import shutdown

            shutdown()


def convert(args) -> None:
    from megalign.convert import export_hf, import_hf

    if args.command == "import":
        r = import_hf(args.hf, args.out, dtype=args.dtype, max_position_embeddings=args.max_position_embeddings,
                      overwrite=args.overwrite)
        print(f"imported {args.hf} ({r['architecture']}, {r['parameters'] / 1e6:.1f}M parameters, {r['dtype']}, "
              f"vocab {r['vocab_size']} padded to {r['padded_vocab_size']}) in {r['seconds']:.1f} s")
        if r["ignored"]:
            print(f"  ignored (no weights of their own): {', '.join(r['ignored'])}")
        print(f"  checkpoint: {r['checkpoint']} (loads at any TP/PP/DP)")
        print(f"  model config: {r['model_yaml']}; tokenizer and config.json: {args.out}/hf")
        print(f"  train from it: python -m megalign.train --config {r['model_yaml']} data.path=PREFIX "
              f"checkpoint.init_from={args.out}")
    else:
        r = export_hf(args.checkpoint, args.out, architecture=args.architecture, dtype=args.dtype,
                      hf_config=args.hf_config, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite)
        print(f"exported {r['checkpoint']} ({r['kind']} checkpoint, step {r['step']}) as {r['architecture']} "
              f"({r['dtype']}, {r['bytes'] / 1e6:.1f} MB) to {r['out']} in {r['seconds']:.1f} s")
        print(f"  files: {', '.join(r['files'])}")
        print(f"  generation: {r['generation']}")


if __name__ == "__main__":
    main()
