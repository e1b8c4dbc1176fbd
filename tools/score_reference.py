#!/usr/bin/env python
"""The reference model's summed log-prob of every response of the preference datasets at data.path, for dpo, ipo
and longpo, at any TP/PP/CP/DP layout (like training):

  torchrun --nproc_per_node N tools/score_reference.py --config RUN.yaml [--model CKPT] [key=value ...]

writes PREFIX.reference.npy and PREFIX.reference.json beside each dataset (megalign/training/reference.py), which
training then reads while the dataset is unchanged."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalign.cli import Parser  # noqa: E402


def main(argv=None):
    parser = Parser(prog="tools/score_reference.py", description=__doc__)
    parser.add_argument("--config", help="the run's YAML config (model, data.path, parallel; see examples/)")
    parser.add_argument("--model", help="the reference checkpoint, weights only (default: checkpoint.init_from)")
    parser.add_argument("--short-data", action="append", metavar="PREFIX",
                        help="longpo: the same groups with short prompts, once per data.path entry (in order); the "
                             "scores are computed on these and written for data.path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.path=out/pairs parallel.tp=2")
    args = parser.parse_args(argv)
    from megalign.training.reference import run

    for path in parser.call(run, args.config, args.overrides, args.model, args.short_data):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
