#!/usr/bin/env bash
# Both stages of the recipe on a laptop CPU, with a tiny model and synthetic data (a few minutes on 2 cores):
#   text documents -> packed at 1024 (long ones cut into pieces) -> stage 1: context extension, token loss,
#   RoPE base 2,000,000; chats -> packed at 1024 -> stage 2: SFT from stage 1's checkpoint, sequence loss.
# It checks the commands and the hand-over between the stages, not the recipe's quality.
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-.venv/bin/python}"
out="${1:-runs/rehearse-longalign}"
rm -rf "$out" && mkdir -p "$out"

# synthetic data: long and short documents, chats, and a BPE tokenizer (BOS <s>, EOS </s>)
"$py" - "$out" <<'PY'
import sys
from megalign.data import synthetic
from megalign.data.tokenizer_training import train_bpe_tokenizer
out = sys.argv[1]
synthetic.make_text_example(f"{out}/raw", n_long=40, n_short=200, min_words=300, max_words=2000, seed=0)
synthetic.make_example(f"{out}/raw", n_long=40, n_short=200, min_words=100, max_words=400, seed=0)
train_bpe_tokenizer(synthetic.corpus(0), f"{out}/tokenizer", vocab_size=2000)
PY

tiny=(model.num_layers=2 model.hidden_size=64 model.ffn_hidden_size=176 model.num_attention_heads=4
      model.num_query_groups=2 model.max_position_embeddings=4096 model.preset=null model.recompute=none
      parallel.tp=1 training.global_batch=4 run.device=cpu run.progress=false checkpoint.interval=0)

# stage 1: documents, no chat template; mixed long/short by ratios; shards 0/2 and 1/2, then the merge
for i in 0 1; do
  "$py" tools/preprocess_data.py --input "$out/raw/long_text.jsonl" "$out/raw/short_text.jsonl" --ratios 1 0.5 \
    --tokenizer "$out/tokenizer" --seq-length 1024 --output-prefix "$out/longtext" --shard "$i/2" --no-progress
done
"$py" tools/merge_data.py --output-prefix "$out/longtext" --no-progress
"$py" -m megalign.train --config examples/longalign-llama2-7b/stage1-context-extension.yaml "${tiny[@]}" \
  data.path="$out/longtext" checkpoint.init_from=null training.steps=6 training.lr=3e-3 \
  run.output_dir="$out/stage1"

# stage 2: chats with a template, initialised from stage 1
"$py" tools/preprocess_data.py --input "$out/raw/long.jsonl" "$out/raw/short.jsonl" --tokenizer "$out/tokenizer" \
  --chat-template llama2 --seq-length 1024 --output-prefix "$out/longalign" --no-progress
"$py" -m megalign.train --config examples/longalign-llama2-7b/stage2-sft.yaml "${tiny[@]}" \
  data.path="$out/longalign" checkpoint.init_from="$out/stage1/checkpoints" training.steps=4 training.lr=1e-3 \
  run.output_dir="$out/stage2"

echo
echo "stage 1: $out/stage1 (data $out/longtext.json); stage 2: $out/stage2 (data $out/longalign.json)"
