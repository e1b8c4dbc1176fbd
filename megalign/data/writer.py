"""Write packs as format v1 or v2 (see format.py) and publish them at a prefix, atomically as a whole.

Layout at PREFIX = DIR/NAME (format.py lists the files):
  DIR/.NAME.v-<hex>/NAME.bin, .idx, ..., .json, .rejects.jsonl   one complete dataset per version directory
  DIR/.NAME.current -> .NAME.v-<hex>                             the commit point: one symlink
  DIR/NAME.bin -> .NAME.current/NAME.bin, ...                     stable symlinks, what readers open
A run writes a new version directory, then `publish` swaps .NAME.current with one rename(2): at every moment
PREFIX is either the previous complete dataset or the new one. Renaming the files one by one cannot do that:
readers find the files by name, so between two renames the old metadata would describe new data. Only after
the swap is the previous version removed. Plain files at PREFIX (an older layout, a failed run's rejects) are
first taken into a version directory (hard link, or copy) without changing what they read as.
Move or copy a dataset with its hidden .NAME.* entries, or dereference the links (cp -L).

`PrefixLock` (PREFIX.lock, flock) keeps a second run off a prefix; `remove_stale` clears what killed runs left.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from megalign.data import format as fmt
from megalign.data.indexed import IndexedWriter
from megalign.data.sample_store import SampleStore
from megalign.errors import OptionError
from megalign.files import fsync_path

PUBLISHED_SUFFIXES = fmt.DATA_SUFFIXES + fmt.OPTIONAL_SUFFIXES + (fmt.REJECTS_SUFFIX, fmt.META_SUFFIX)


def write_packs(
    prefix: str,
    store: SampleStore,
    sample_slots: np.ndarray,
    packs: list[list[int]],
    token_dtype: type,
    on_pack: Callable[[int], None] = lambda n: None,
) -> int:
    """Write the token and loss-mask IndexedDatasets of `packs` (lists of sample ids) at `prefix`; returns the
    largest token id written (recorded in the metadata: training checks it against the model's vocabulary)."""
    tokens_builder = IndexedWriter(prefix, token_dtype)
    mask_builder = IndexedWriter(prefix + fmt.LOSS_MASK_SUFFIX, np.uint8)
    largest = -1
    for samples in packs:
        parts = [store.get(int(sample_slots[s])) for s in samples]
        lengths = [len(t) for t, _ in parts]
        tokens = np.concatenate([t for t, _ in parts])
        largest = max(largest, int(tokens.max()) if len(tokens) else -1)
        tokens_builder.add_document(tokens, lengths)
        mask_builder.add_document(np.concatenate([m for _, m in parts]), lengths)
        on_pack(sum(lengths))
    tokens_builder.finalize()
    mask_builder.finalize()
    return largest


def write_position_offsets(prefix: str, offsets: np.ndarray) -> None:
    """Each sequence's first position id, in .idx order (the dataset's packs, their samples in order)."""
    with open(fmt.position_offsets_file(prefix), "wb") as f:
        np.save(f, np.ascontiguousarray(offsets, dtype="<i8"))


def write_roles(prefix: str, roles: np.ndarray) -> None:
    """Each sequence's role in its preference group, in .idx order."""
    with open(fmt.roles_file(prefix), "wb") as f:
        np.save(f, np.ascontiguousarray(roles, dtype="i1"))


def write_reference_logps(prefix: str, values: np.ndarray) -> None:
    """Each sequence's reference score (NaN for prompts), in .idx order."""
    with open(fmt.reference_logps_file(prefix), "wb") as f:
        np.save(f, np.ascontiguousarray(values, dtype="<f8"))


def file_records(prefix: str) -> dict[str, dict]:
    """Size and sha256 of each data file present, keyed by its suffix (what PREFIX.json stores)."""
    suffixes = list(fmt.DATA_SUFFIXES) + [s for s in fmt.OPTIONAL_SUFFIXES if os.path.exists(prefix + s)]
    return {
        suffix: {"bytes": os.path.getsize(prefix + suffix), "sha256": fmt.sha256_file(Path(prefix + suffix))}
        for suffix in suffixes
    }


# ---------------------------------------------------------------------------------------------- publishing

def _name(prefix: str) -> str:
    return Path(prefix).name


def current_link(prefix: str) -> Path:
    return Path(prefix).parent / f".{_name(prefix)}.current"


def make_private_dir(prefix: str, kind: str) -> Path:
    """A new directory next to the prefix: kind "v" (a version being written) or "tmp" (scratch)."""
    path = Path(prefix).parent / f".{_name(prefix)}.{kind}-{secrets.token_hex(8)}"
    path.mkdir()
    return path


def current_version(prefix: str) -> Path | None:
    link = current_link(prefix)
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if target.is_dir() else None


def _link_target(prefix: str, suffix: str) -> str:
    return f"{current_link(prefix).name}/{_name(prefix)}{suffix}"


def _is_our_link(prefix: str, suffix: str) -> bool:
    path = Path(prefix + suffix)
    return path.is_symlink() and os.readlink(path) == _link_target(prefix, suffix)


def _replace_with_symlink(target: str, path: Path, work: Path) -> None:
    """Point `path` at `target` in one rename (the temporary link lives in `work`, on the same filesystem)."""
    temp = work / f"link-{secrets.token_hex(8)}"
    os.symlink(target, temp)
    os.replace(temp, path)


def _adopt_plain_files(prefix: str, work: Path) -> None:
    """Take files at PREFIX that are not our links into the current version, each reading the same throughout."""
    plain = [s for s in PUBLISHED_SUFFIXES if os.path.lexists(prefix + s) and not _is_our_link(prefix, s)]
    if not plain:
        return
    version = current_version(prefix)
    if version is None:
        version = make_private_dir(prefix, "v")
    for suffix in plain:
        path = Path(prefix + suffix)
        if path.exists():  # a dangling link has nothing to keep
            temp = version / f".adopt-{secrets.token_hex(8)}"
            try:
                os.link(path, temp)
            except OSError:  # no hard links here (or across a symlink's filesystem): a copy reads the same
                shutil.copy2(path, temp)
            os.replace(temp, version / (_name(prefix) + suffix))
    if current_version(prefix) != version:
        _replace_with_symlink(version.name, current_link(prefix), work)
    for suffix in plain:
        _replace_with_symlink(_link_target(prefix, suffix), Path(prefix + suffix), work)


def publish(version: Path, prefix: str, work: Path) -> None:
    """Make the complete dataset in `version` (a directory from make_private_dir holding NAME.*) the one at PREFIX.

    `work` is a scratch directory next to the prefix, for temporary links.
    """
    _adopt_plain_files(prefix, work)
    # Links first: on a fresh prefix they dangle (nothing reads as present) until the swap below. An optional
    # file gets its link only where the new version has it.
    absent = [s for s in fmt.OPTIONAL_SUFFIXES if not (version / (_name(prefix) + s)).exists()]
    for suffix in PUBLISHED_SUFFIXES:
        if suffix not in absent and not _is_our_link(prefix, suffix):
            _replace_with_symlink(_link_target(prefix, suffix), Path(prefix + suffix), work)
    for path in [*version.iterdir(), version]:  # durable before they become visible
        fsync_path(path)
    previous = current_version(prefix)
    _replace_with_symlink(version.name, current_link(prefix), work)  # the commit
    fsync_path(Path(prefix).parent)
    for suffix in absent:  # the previous version's optional files: their links now dangle (read as absent)
        if _is_our_link(prefix, suffix):
            os.unlink(prefix + suffix)
    if previous is not None and previous != version:
        shutil.rmtree(previous, ignore_errors=True)


def remove_stale(prefix: str) -> list[Path]:
    """Remove the version and scratch directories that killed runs left at this prefix; call holding the lock."""
    parent, current = Path(prefix).parent, current_version(prefix)
    # Also the mkdtemp scratch (8 characters) of runs from before the lock.
    pattern = re.compile(rf"\.{re.escape(_name(prefix))}\.(?:v-[0-9a-f]{{16}}|tmp-[0-9a-f]{{16}}|tmp-[a-z0-9_]{{8}})")
    removed = []
    for entry in parent.iterdir():
        if pattern.fullmatch(entry.name) and entry != current and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class PrefixLock:
    """An exclusive, non-blocking flock on PREFIX.lock for a whole run; the file is removed on release."""

    def __init__(self, prefix: str):
        self.prefix, self.path, self.fd = prefix, fmt.lock_file(prefix), None

    def __enter__(self) -> PrefixLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise OptionError(
                    "output_prefix", f"{self.prefix}: another preprocessing run holds {self.path}"
                    + (f" (pid {holder})" if holder else "") + "; wait for it to finish or choose another {output_prefix}",
                    mentions=("output_prefix",)) from None
            # The holder before us unlinks the file as it lets go: only a lock on the file at the path counts.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)  # still holding it: a run that opened the old file retries on a new one
        finally:
            os.close(self.fd)
            self.fd = None
