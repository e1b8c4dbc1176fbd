#!/usr/bin/env python
"""Join the shards of a preprocessing run (preprocess_data.py --shard I/N) into one dataset. See `--help` and
megalign/data/shards.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalign.data.cli import merge_main  # noqa: E402

if __name__ == "__main__":
    merge_main()
