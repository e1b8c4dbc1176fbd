#!/usr/bin/env python
"""Which TP/PP/CP/DP x recompute layouts fit a model, its data and a cluster, best first (megalign.plan)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalign.plan.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
