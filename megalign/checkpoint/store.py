"""Checkpoints on disk: written aside, published by a rename and a tracker written last, pruned to the newest N.

    ROOT/
      latest                    the name of the newest complete checkpoint (replaced atomically, written last)
      step_0000100/             a complete checkpoint: megatron dist_checkpointing files + megalign.json
      step_0000200/
      .partial-step_0000300/    a save in progress (or one killed mid-way: removed by the next save)
      abandoned-step_0000400/   a checkpoint newer than one published later: the run went back to an older
                                step (checkpoint.resume_from); kept, but never resumed from or counted by keep

A checkpoint directory is complete when it holds `megalign.json`, which is written after every rank has
finished writing and lists each file with its size and its xxh3-64 checksum (computed by the ranks in parallel,
each over its share of the files), so a truncated file is caught before megatron reads it and a damaged one
(same size, other bytes) when it is loaded. Killing a run at any moment leaves `latest` naming a complete
checkpoint (or no `latest` at all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from megalign.errors import MegalignError
from megalign.files import fsync_path, write_atomically

MANIFEST = "megalign.json"
TRACKER = "latest"
PARTIAL_PREFIX = ".partial-"
ABANDONED_PREFIX = "abandoned-"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: str | Path) -> int:
    """The step of a checkpoint directory (step_0000100 -> 100)."""
    found = _STEP_DIR.match(Path(path).name)
    if found is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNN)")
    return int(found.group(1))


CHECKSUM = "xxh3_64"
_CHUNK = 8 << 20


def checksum(path: Path) -> str:
    """The xxh3-64 digest of a file (~10 GB/s per core: cheap next to writing it)."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def share_of(names: list[str], rank: int, world: int) -> list[str]:
    """The files one of `world` ranks hashes: every world-th name, in sorted order."""
    return sorted(names)[rank::world]


def damaged_files(path: Path, checksums: dict[str, str], names: list[str]) -> list[str]:
    """Those of `names` whose checksum is not the recorded one."""
    return [name for name in names if checksum(path / name) != checksums[name]]


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

    def publish(self, step: int, manifest: dict, keep: int | None, checksums: dict[str, str] | None = None) -> Path:
        """Seal the partial directory of `step` (manifest with file sizes, and the checksums the ranks computed:
        every file's, or none), move it into place, then point the tracker at it. Called by one process after
        every rank has finished writing."""
        partial = self.partial_dir(step)
        for path in partial.rglob("*"):
            if path.is_file():
                fsync_path(path)
        sizes = file_sizes(partial)
        if checksums is None:
            checksums = {name: checksum(partial / name) for name in sizes}
        if set(checksums) != set(sizes):
            raise MegalignError(f"checkpoint {partial}: checksums of {sorted(checksums)} for files {sorted(sizes)}")
        manifest = {"format_version": FORMAT_VERSION, **manifest, "files": sizes,
                    "checksums": {"algorithm": CHECKSUM, "files": checksums}}
        write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        final = self.root / step_dir_name(step)
        if final.exists():  # a step saved again (e.g. a rerun that did not resume): the new save wins
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_path(self.root)
        write_atomically(self.root / TRACKER, final.name + "\n")
        self._set_aside_newer_than(step)
        if keep:
            self.prune(keep)
        return final

    def _set_aside_newer_than(self, step: int) -> list[Path]:
        """Checkpoints of later steps than the one just published belong to a timeline the run left (it resumed
        from an older step): renamed aside, so that neither a lost tracker nor pruning mistakes them for this
        run's newest. Nothing is deleted."""
        moved = []
        for path in self.complete():
            if int(_STEP_DIR.match(path.name).group(1)) > step:
                target = self.root / f"{ABANDONED_PREFIX}{path.name}"
                if target.exists():
                    shutil.rmtree(target)
                os.replace(path, target)
                moved.append(target)
        return moved

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
        """The checkpoint the tracker names, if it is complete. A tracker that is unreadable or names something
        else (damaged) counts as lost: latest() then takes the newest complete checkpoint."""
        tracker = self.root / TRACKER
        if not tracker.is_file():
            return None
        try:
            name = tracker.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _STEP_DIR.match(name):
            return None
        path = self.root / name
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
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegalignError(f"checkpoint {manifest_path}: not valid JSON ({e}); resume from an older checkpoint "
                            "(checkpoint.resume_from=...)") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version != FORMAT_VERSION:
        raise MegalignError(f"checkpoint {path}: format_version {version!r}; this megalign reads "
                            f"{FORMAT_VERSION}")
    problem = _manifest_problem(manifest)
    if problem:
        raise MegalignError(f"checkpoint {manifest_path}: {problem}; the manifest is damaged: resume from an older "
                            "checkpoint (checkpoint.resume_from=...)")
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


def _manifest_problem(manifest) -> str | None:
    """What is wrong with the shape of a manifest, or None."""
    if not isinstance(manifest, dict):
        return f"holds a {type(manifest).__name__}, not an object"
    for key, kind in (("format_version", int), ("kind", str), ("step", int), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            return f"key {key!r} is missing or not a {kind.__name__}"
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in manifest["files"].items()):
        return "'files' is not a map of names to sizes"
    checksums = manifest.get("checksums")
    if checksums is not None and (not isinstance(checksums, dict) or checksums.get("algorithm") != CHECKSUM
                                  or not isinstance(checksums.get("files"), dict)
                                  or set(checksums["files"]) != set(manifest["files"])):
        return f"'checksums' is not {CHECKSUM} digests of the files it lists"
    return None
