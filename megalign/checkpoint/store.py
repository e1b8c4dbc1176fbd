"""Checkpoints on disk: written aside, published by a rename and a tracker written last, pruned to the newest N.

    ROOT/
      latest                    the name of the newest complete checkpoint (replaced atomically, written last)
      step_0000100/             a complete checkpoint: megatron dist_checkpointing files + megalign.json
      step_0000200/
      .partial-step_0000300/    a save in progress (or one killed mid-way: removed by the next save)

A checkpoint directory is complete when it holds `megalign.json`, which is written after every rank has
finished writing and lists each file with its size, so a truncated file is caught before megatron reads it.
Killing a run at any moment leaves `latest` naming a complete checkpoint (or no `latest` at all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from megalign.errors import MegalignError

MANIFEST = "megalign.json"
TRACKER = "latest"
PARTIAL_PREFIX = ".partial-"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file under `directory` (relative name -> bytes), except the manifest itself."""
    sizes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            sizes[str(path.relative_to(directory))] = path.stat().st_size
    return sizes


class CheckpointStore:
    """The checkpoints of one run, under `root` (by default `run.output_dir/checkpoints`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- writing -----------------------------------------------------------------------------------------
    def partial_dir(self, step: int) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """A fresh directory to write the checkpoint of `step` into (one process calls this, before the others
        write). Leftovers of saves that were killed are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        path = self.partial_dir(step)
        path.mkdir()
        return path

    def publish(self, step: int, manifest: dict, keep: int | None) -> Path:
        """Seal the partial directory of `step` (manifest with file sizes), move it into place, then point the
        tracker at it. Called by one process after every rank has finished writing."""
        partial = self.partial_dir(step)
        for path in partial.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        manifest = {"format_version": FORMAT_VERSION, **manifest, "files": file_sizes(partial)}
        _write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        final = self.root / step_dir_name(step)
        if final.exists():  # a step saved again (e.g. a rerun that did not resume): the new save wins
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.root)
        _write_atomically(self.root / TRACKER, final.name + "\n")
        if keep:
            self.prune(keep)
        return final

    def prune(self, keep: int) -> list[Path]:
        """Remove all but the newest `keep` complete checkpoints (never the one the tracker names)."""
        tracked = self.tracked()
        removed = []
        for path in self.complete()[:-keep]:
            if tracked is None or path != tracked:
                shutil.rmtree(path)
                removed.append(path)
        return removed

    # -- reading -----------------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def tracked(self) -> Path | None:
        tracker = self.root / TRACKER
        if not tracker.is_file():
            return None
        path = self.root / tracker.read_text().strip()
        return path if (path / MANIFEST).is_file() else None

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the tracker's, else the newest complete one (a tracker can be lost
        when a run is killed between the rename and the tracker update)."""
        tracked = self.tracked()
        if tracked is not None:
            return tracked
        complete = self.complete()
        return complete[-1] if complete else None


def read_manifest(path: str | Path) -> dict:
    """The manifest of the checkpoint at `path`, after checking that every file it lists is there, whole."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise MegalignError(f"checkpoint {path}: no such directory")
    if not manifest_path.is_file():
        raise MegalignError(f"checkpoint {path}: no {MANIFEST}, so it is not a complete megalign checkpoint "
                            "(a save that was interrupted, or another tool's directory)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise MegalignError(f"checkpoint {manifest_path}: not valid JSON ({e})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MegalignError(f"checkpoint {path}: format_version {version!r}; this megalign reads "
                            f"{FORMAT_VERSION}")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise MegalignError(f"checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != expected:
            raise MegalignError(f"checkpoint {path}: {name} has {size} bytes, the manifest says {expected} "
                                "(truncated or overwritten); resume from an older checkpoint "
                                "(checkpoint.resume_from=...)")
    return manifest
