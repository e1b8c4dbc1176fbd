#!/usr/bin/env python
"""Make the built-in example offline: a long-context retrieval set, short chats, and a BPE tokenizer."""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalign.data import synthetic  # noqa: E402
from megalign.data.tokenizer_training import train_bpe_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="directory for long.jsonl, short.jsonl and tokenizer/")
    p.add_argument("--long", type=int, default=200, help="long retrieval samples")
    p.add_argument("--short", type=int, default=800, help="short chat samples")
    p.add_argument("--min-words", type=int, default=300)
    p.add_argument("--max-words", type=int, default=1500)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    paths = synthetic.make_example(args.out, args.long, args.short, args.min_words, args.max_words, args.seed)
    tok = train_bpe_tokenizer(synthetic.corpus(args.seed), os.path.join(args.out, "tokenizer"), args.vocab_size)
    print(f"wrote {paths['long']} ({args.long}), {paths['short']} ({args.short}), tokenizer {tok}")


if __name__ == "__main__":
    main()
