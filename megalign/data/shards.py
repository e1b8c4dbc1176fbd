"""Parts: what tokenizing a share of the records leaves for packing and writing; shards of one corpus.

Packing needs every sample's length before it places the first one, so preprocessing is two steps: pass 1 turns
records into a *part* (spilled samples, their lengths, the rejects, the counts), and the finish packs the samples
of all parts and writes the dataset. A single run has one part, in its scratch directory. `--shard I/N` runs
publish theirs at PREFIX.shard-I-of-N/, and a merge (tools/merge_data.py) finishes all N as one dataset: the
samples are put back in the order a single run has them (input, line, then the record's own order), so the
packs, the files and the metadata are byte-identical to a single run with the same options and seed.

Which records a shard takes: the lines of all inputs, counted in order (blank ones included), in blocks of
`block_lines`; block b belongs to shard b mod N. Every shard reads every line, because line numbers name the
rejects and seed the mixing ratios, but parses and tokenizes only its own blocks; reading runs at disk speed, so
sharding pays while tokenizing is the slower part (a .gz input is decompressed by every shard: split a large
corpus into several files, or store it plain).

A part directory:
  samples.tokens, samples.mask     the SampleStore (sample_store.py): each distinct sample once, by slot
  slots.npy                        [slots, 3] int64: length, loss targets, position offset
  samples.npy                      [samples, 3] int64: slot, input index, line (a slot once per copy)
  roles.npy, reference_logps.npy   preference records only: per slot, its role in its group (int8, groups.py)
                                   and its reference score (float64, NaN: none, and for every prompt)
  rejects.jsonl, reject_keys.npy   the rejected records (lines of the dataset's rejects file), their (input, line)
  part.json                        the run (every option that decides the output), the shard, per-input counts;
                                   written last, then the directory is renamed into place: a part is complete or
                                   absent
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from megalign.data import writer
from megalign.data.sample_store import SampleStore
from megalign.data.stats import InputCounts
from megalign.errors import MegalignError, OptionError
from megalign.files import fsync_path

PART_FORMAT = 1
PART_META = "part.json"
SLURM_ARRAY = "slurm"  # --shard slurm: this task's place in a Slurm job array


# ---------------------------------------------------------------------------------------------- shard specs

def parse_shard(text: str, environ=os.environ) -> tuple[int, int]:
    """"I/N" (0 <= I < N), or "slurm": I and N from the Slurm job array this task runs in."""
    if text == SLURM_ARRAY:
        return _slurm_array_shard(environ)
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match:
        raise OptionError("shard", f"{text!r} is not I/N (e.g. 0/8: the first of 8 shards) or {SLURM_ARRAY}")
    return check_shard(int(match[1]), int(match[2]))


def check_shard(index: int, count: int) -> tuple[int, int]:
    if count < 1 or not 0 <= index < count:
        raise OptionError("shard", f"{index}/{count}: I must be in [0, N) (shards 0/{max(count, 1)} .. "
                          f"{max(count, 1) - 1}/{max(count, 1)}); in a Slurm array --array=0-{max(count, 1) - 1} "
                          f"with {{shard}} {SLURM_ARRAY}", mentions=("shard",))
    return index, count


def _slurm_array_shard(environ) -> tuple[int, int]:
    try:
        task, first = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        step, count = int(environ.get("SLURM_ARRAY_TASK_STEP", "1")), int(environ["SLURM_ARRAY_TASK_COUNT"])
    except (KeyError, ValueError):
        raise OptionError("shard", f"{SLURM_ARRAY} needs a Slurm job array (SLURM_ARRAY_TASK_ID and "
                          "SLURM_ARRAY_TASK_COUNT are unset): sbatch --array=0-7 ..., or give I/N") from None
    if (task - first) % step:
        raise OptionError("shard", f"{SLURM_ARRAY}: task {task} is not on the array's grid (min {first}, step {step})")
    return check_shard((task - first) // step, count)


def shard_prefix(prefix: str, index: int, count: int) -> str:
    """Where shard I of N publishes its part (a directory) and takes its lock (that path + .lock)."""
    return f"{prefix}.shard-{index}-of-{count}"


def owns(block: int, shard: tuple[int, int] | None) -> bool:
    return shard is None or block % shard[1] == shard[0]


def find_shards(prefix: str) -> list[Path]:
    """The complete parts of the shards of `prefix`, in shard order; a one-line error unless exactly one N has all
    of its shards 0..N-1."""
    name = Path(prefix).name
    pattern = re.compile(rf"{re.escape(name)}\.shard-(\d+)-of-(\d+)")
    found: dict[int, dict[int, Path]] = {}
    parent = Path(prefix).parent
    for entry in parent.iterdir() if parent.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / PART_META).is_file():
            found.setdefault(int(match[2]), {})[int(match[1])] = entry
    if not found:
        raise OptionError("output_prefix", f"{prefix}: no shards to merge (no complete {name}.shard-I-of-N/ in "
                          f"{parent}); run tools/preprocess_data.py --shard I/N for each I first")
    if len(found) > 1:
        counts = ", ".join(map(str, sorted(found)))
        raise OptionError("output_prefix", f"{prefix}: shards of different counts N ({counts}) lie here; remove the "
                          "ones of the other runs")
    count, shards = next(iter(found.items()))
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise OptionError("output_prefix", f"{prefix}: shards {', '.join(f'{i}/{count}' for i in missing[:8])} of "
                          f"{count} are missing or incomplete; run them (tools/preprocess_data.py --shard "
                          f"I/{count}), then merge")
    return [shards[i] for i in range(count)]


# ---------------------------------------------------------------------------------------------- parts

@dataclass
class Part:
    """One part, open for reading (its store) or just collected (a single run's)."""

    store: SampleStore
    slots: np.ndarray  # [slots, 3] int64: length, loss targets, position offset
    samples: np.ndarray  # [samples, 3] int64: slot, input index, line
    counts: list[InputCounts]
    rejects: Path
    reject_keys: np.ndarray  # [rejects, 2] int64: input index, line
    run: dict  # every option that decides the output (identical across the shards of one corpus)
    shard: tuple[int, int] | None = None
    roles: np.ndarray | None = None  # [slots] int8: preference records' roles in their groups; None: other kinds
    reference_logps: np.ndarray | None = None  # [slots] float64 with roles: reference scores, NaN where none

    def close(self) -> None:
        self.store.close()


class PartCollector:
    """What pass 1 records while it runs: per slot and per sample (8 bytes a number: memory grows with the number
    of samples only, and slowly), and the rejects, streamed to `rejects`."""

    def __init__(self, store: SampleStore, rejects: Path):
        self.store = store
        self.rejects_path = rejects
        self.rejects = open(rejects, "w", encoding="utf-8")
        self._slots, self._samples, self._reject_keys = array("q"), array("q"), array("q")
        self._roles, self._reference = array("b"), array("d")

    def add_slot(self, tokens: np.ndarray, loss_mask: np.ndarray | None, loss_targets: int, offset: int,
                 role: int | None = None, reference: float | None = None) -> int:
        """Store one slot; preference records give every slot its role (and a reference score, or None)."""
        slot = self.store.append(tokens, loss_mask)
        self._slots.extend((len(tokens), loss_targets, offset))
        if role is not None:
            self._roles.append(role)
            self._reference.append(float("nan") if reference is None else reference)
        return slot

    def add_samples(self, slots: list[int], copies: int, input_index: int, line: int) -> None:
        for _ in range(copies):
            for slot in slots:
                self._samples.extend((slot, input_index, line))

    def add_reject(self, input_index: int, line: int, record: dict) -> None:
        self.rejects.write(json.dumps(record) + "\n")
        self._reject_keys.extend((input_index, line))

    def __enter__(self) -> "PartCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.rejects.close()

    def finish(self, counts: list[InputCounts], run: dict, shard: tuple[int, int] | None = None) -> Part:
        """The part collected (call after the `with` block has closed the rejects file)."""
        roles = reference = None
        if run["record_kind"] == "preference":
            roles = np.frombuffer(self._roles, dtype=np.int8).copy()
            reference = np.frombuffer(self._reference, dtype=np.float64).copy()
        return Part(self.store, _as_rows(self._slots, 3), _as_rows(self._samples, 3), counts, self.rejects_path,
                    _as_rows(self._reject_keys, 2), run, shard, roles, reference)


def _as_rows(a: array, width: int) -> np.ndarray:
    return np.frombuffer(a, dtype=np.int64).reshape(-1, width).copy() if len(a) else np.zeros((0, width), np.int64)


def save_part(part: Part, directory: Path) -> None:
    """Write the arrays and part.json into `directory` (which holds the store and the rejects already), durably."""
    np.save(directory / "slots.npy", part.slots)
    np.save(directory / "samples.npy", part.samples)
    np.save(directory / "reject_keys.npy", part.reject_keys)
    if part.roles is not None:
        np.save(directory / "roles.npy", part.roles)
        np.save(directory / "reference_logps.npy", part.reference_logps)
    meta = {"part_format": PART_FORMAT, "shard": list(part.shard) if part.shard else None, "run": part.run,
            "counts": [c.as_dict() for c in part.counts], "num_slots": len(part.slots),
            "num_samples": len(part.samples), "num_rejects": len(part.reject_keys)}
    for path in directory.iterdir():
        fsync_path(path)
    (directory / PART_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    fsync_path(directory / PART_META)
    fsync_path(directory)


def publish_part(scratch: Path, destination: Path) -> None:
    """Rename the complete part in `scratch` to `destination`, replacing an older part there (asked for with
    overwrite): the old one is moved aside first, then removed."""
    if destination.exists():
        aside = writer.make_private_dir(str(destination), "tmp")
        os.replace(destination, aside / destination.name)
        os.replace(scratch, destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(scratch, destination)
    fsync_path(destination.parent)


def load_part(directory: Path) -> Part:
    try:
        meta = json.loads((directory / PART_META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegalignError(f"{directory / PART_META}: cannot read it ({e}); run that shard again") from None
    if meta.get("part_format") != PART_FORMAT:
        raise MegalignError(f"{directory}: part format {meta.get('part_format')!r}, this megalign reads "
                            f"{PART_FORMAT}; run that shard again with this version")
    slots = np.load(directory / "slots.npy")
    samples = np.load(directory / "samples.npy")
    reject_keys = np.load(directory / "reject_keys.npy")
    roles = reference = None
    if meta["run"]["record_kind"] == "preference":
        try:
            roles, reference = np.load(directory / "roles.npy"), np.load(directory / "reference_logps.npy")
        except (OSError, ValueError) as e:
            raise MegalignError(f"{directory}: cannot read its roles ({e}); run that shard again") from None
    if (len(slots), len(samples), len(reject_keys)) != (meta["num_slots"], meta["num_samples"], meta["num_rejects"]) \
            or (roles is not None and not len(roles) == len(reference) == len(slots)):
        raise MegalignError(f"{directory}: its arrays do not match its part.json (damaged); run that shard again")
    store = SampleStore.open(directory, np.dtype(meta["run"]["token_dtype"]), slots[:, 0])
    counts = [InputCounts.from_dict(c) for c in meta["counts"]]
    return Part(store, slots, samples, counts, directory / "rejects.jsonl", reject_keys, meta["run"],
                tuple(meta["shard"]) if meta["shard"] else None, roles, reference)


def check_same_run(parts: list[Part], directories: list[Path]) -> dict:
    """The run all parts were made by; a one-line error naming the first option two shards disagree on."""
    first = parts[0].run
    for part, directory in zip(parts[1:], directories[1:]):
        for key in sorted(set(first) | set(part.run)):
            if first.get(key) != part.run.get(key):
                raise MegalignError(f"{directory} was made with {key}={part.run.get(key)!r}, but {directories[0]} "
                                    f"with {first.get(key)!r}: the shards of one dataset need the same inputs and "
                                    "options; run the odd ones again")
    return first


# ---------------------------------------------------------------------------------------------- merged view

class MergedStores:
    """The stores of several parts as one: slot s of part k is global slot offsets[k] + s."""

    def __init__(self, parts: list[Part]):
        self.stores = [p.store for p in parts]
        self.offsets = np.cumsum([0] + [len(p.slots) for p in parts])

    def get(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self.offsets, slot, side="right")) - 1
        return self.stores[k].get(slot - int(self.offsets[k]))


def sample_order(parts: list[Part], keys: bool = False):
    """Every sample of the parts in a single run's order: (global slot per sample, [slots, 3] of all parts), and
    with `keys` the [samples, 2] (input index, line) of each sample too."""
    slots = np.concatenate([p.slots for p in parts]) if parts else np.zeros((0, 3), np.int64)
    offsets = np.cumsum([0] + [len(p.slots) for p in parts])
    samples = np.concatenate([p.samples + [[o, 0, 0]] for p, o in zip(parts, offsets)])
    if len(parts) > 1:  # lexsort is stable: a record's samples keep their order (they are all in one part)
        samples = samples[np.lexsort((samples[:, 2], samples[:, 1]))]
    if keys:
        return samples[:, 0].copy(), slots, samples[:, 1:].copy()
    return samples[:, 0].copy(), slots


def slot_column(parts: list[Part], name: str) -> np.ndarray:
    """A per-slot array of all parts ("roles" or "reference_logps"), in sample_order's global slot order."""
    return np.concatenate([getattr(p, name) for p in parts])


def merged_rejects(parts: list[Part]) -> Iterator[str]:
    """The lines of every part's rejects file, in (input, line) order."""
    def lines(part: Part):
        with open(part.rejects, encoding="utf-8") as f:
            for key, text in zip(part.reject_keys.tolist(), f):
                yield tuple(key), text

    for _, text in heapq.merge(*(lines(p) for p in parts), key=lambda kv: kv[0]):
        yield text


def total_counts(parts: list[Part]) -> list[InputCounts]:
    """Per input, the counts of all parts added up."""
    totals = [InputCounts(c.path, c.ratio, kind=c.kind) for c in parts[0].counts]
    for part in parts:
        for total, c in zip(totals, part.counts):
            total.add(c)
    return totals
