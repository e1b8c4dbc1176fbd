#!/usr/bin/env python
"""Print a packed dataset's stats; `--plot FILE.png` draws its length histogram and pack fill."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalign.data.cli import inspect_main  # noqa: E402

if __name__ == "__main__":
    inspect_main()
