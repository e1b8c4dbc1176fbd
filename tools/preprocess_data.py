#!/usr/bin/env python
"""JSONL chats or text documents -> packed, indexed binaries. See `--help` and megalign/data/preprocess.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalign.data.cli import preprocess_main  # noqa: E402

if __name__ == "__main__":
    preprocess_main()
