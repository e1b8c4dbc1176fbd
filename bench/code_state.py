"""The code a benchmark measured, for the first line of its output."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_state() -> str:
    """The commit measured, flagged when megalign/ has uncommitted changes (the numbers then belong to neither)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted changes in megalign/" if git("status", "--porcelain", "--", "megalign") else ""
    return f"megalign at {git('rev-parse', '--short', 'HEAD') or 'unknown commit'}{dirty}"
