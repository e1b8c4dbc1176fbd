#!/usr/bin/env bash
# The whole pipeline on a small built-in example, offline, on a laptop CPU (about 3 minutes on 2 cores):
#   make a long-context retrieval set + short chats and a BPE tokenizer, pack them at 4k, inspect the result,
#   then train a tiny Llama-style model on it with 2 processes (tensor parallel, gloo, CPU mode), and evaluate it
#   on a small needle-in-a-haystack grid (its accuracy is low: the point is the whole path).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/install.sh | tail -n 1)
py="$venv/bin/python"
out="${1:-runs/quickstart}"
mkdir -p "$out"

"$py" tools/make_example_data.py --out "$out/data" --long 200 --short 800
"$py" tools/preprocess_data.py \
  --input "$out/data/long.jsonl" "$out/data/short.jsonl" --ratios 1 0.5 \
  --tokenizer "$out/data/tokenizer" --chat-template chatml \
  --seq-length 4096 --packing bfd --workers 2 --seed 1234 \
  --output-prefix "$out/packed" --overwrite
"$py" tools/inspect_dataset.py "$out/packed" --plot "$out/packed.png"

rm -rf "$out/train"  # a fresh run each time (a run pointed at its own checkpoints would resume instead)
"$venv/bin/torchrun" --standalone --nproc_per_node 2 -m megalign.train --config examples/tiny.yaml \
  data.path="$out/packed" run.output_dir="$out/train" parallel.tp=2 run.progress=false

# the trained checkpoint, exported to Hugging Face format on the fly, answering with transformers' generate
rm -rf "$out/eval"
"$py" -m megalign.eval --model "$out/train/checkpoints" --tokenizer "$out/data/tokenizer" --chat-template chatml \
  --backend hf --device cpu --tasks needle --max-length 4096 --needle-lengths 4 --needle-depths 3 \
  --out "$out/eval" --no-progress

echo
echo "dataset: $out/packed.{bin,idx,json}, $out/packed_loss_mask.{bin,idx}; rejects: $out/packed.rejects.jsonl"
echo "plot:    $out/packed.png"
echo "train:   metrics $out/train/metrics.jsonl, log $out/train/train.log, TensorBoard $out/train/tensorboard,"
echo "         checkpoint $out/train/checkpoints/"
echo "eval:    items $out/eval/items.jsonl, results $out/eval/results.md, needle heatmap $out/eval/needle.png"
