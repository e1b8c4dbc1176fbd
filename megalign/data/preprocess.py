"""JSONL records (chats, text documents or preference groups) -> packed, indexed binaries (format v1; v2 for
preference groups). The library behind
tools/preprocess_data.py and tools/merge_data.py.

Three passes, memory bounded by the number of samples (lengths), never by the number of tokens:
  1. read lines, decide each record's copies from the mixing ratios (seeded per record), and in worker
     processes parse, validate, apply the chat template (chats) or BOS/EOS (documents) and tokenize; spill kept
     samples (a long document as its pack-length pieces) to a scratch store, rejected records to the rejects
     (encoding.py)
  2. pack the sample lengths (preference records: the total lengths of their groups, each group one unit that is
     never split, its samples consecutive in role order: prompt, chosen, rejected 0 .. M-1)
  3. write the packs (megatron-core's IndexedDataset files, indexed.py: no torch import) and the metadata into
     a new version directory, then publish it with one atomic rename: PREFIX is the previous complete dataset or
     the new one, never neither (writer.py describes the layout).
A record's kind (chat, text or preference) comes from its keys; one input holds one kind and one run one kind (records.py).
With `shard` (I, N), a run does pass 1 for its share of the records only and publishes it as a part
(shards.py); `merge` does passes 2 and 3 over the N parts: the same dataset, byte for byte, as one run.

A run holds PREFIX.lock throughout, so a second run on the prefix fails instead of mixing files; holding it, a
run removes the version and scratch directories that killed runs left. A bad record is a rejected record with
its reason, never the end of the run; a file that cannot be read (a truncated .gz) is a MegalignError, and so
is a record of the other kind than its input's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import megalign
from megalign.data import format as fmt
from megalign.data import packing, preference, shards, stats, writer
from megalign.data.documents import POSITION_MODES, DocumentEncoder
from megalign.data.encoding import tokenize_records
from megalign.data.indexed import optimal_token_dtype
from megalign.data.records import CHAT, PREFERENCE, TEXT, input_kind
from megalign.data.sample_store import SampleStore
from megalign.data.shards import Part, PartCollector
from megalign.data.stats import InputCounts
from megalign.data.templates import TEMPLATE_NAMES, make_encoder
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError, OptionError

OVERLENGTH_POLICIES = ("drop", "truncate", "split")  # split: text records only; preference records: drop only
RECORD_ORDER = {CHAT: 0, TEXT: 1, PREFERENCE: 2}  # how a mix of kinds is named
MAX_SEQ_LENGTH = 2**31 - 1  # megatron's .idx stores sequence lengths as int32


@dataclass
class PreprocessOptions:
    inputs: list[str]
    tokenizer: str
    seq_length: int
    output_prefix: str
    chat_template: str | None = None  # chat records: the template (templates.py); text records take none
    packing: str = "bfd"
    ratios: list[float] | None = None  # per input: expected copies of each record (0.5 keeps half, 2 doubles)
    group_size: int = 8  # samples per group for `sorted`
    overlength: str | None = None  # a sample longer than seq_length; None: drop (chat), split (text)
    min_piece_length: int | None = None  # text: a split document's last piece is dropped below this; None: 2
    positions: str = "restart"  # text: each piece's positions restart at 0, or continue the document's
    max_reject_fraction: float = 0.01
    workers: int = 1
    seed: int = 1234
    max_record_bytes: int = 64 << 20  # a longer line is rejected unread (memory stays bounded)
    shard: tuple[int, int] | None = None  # (I, N): tokenize shard I of N into a part; tools/merge_data.py joins them
    shard_block_lines: int = 64  # shards take turns in blocks of this many lines (shards.py)
    overwrite: bool = False
    progress: bool | None = None  # None: only on a terminal
    _kinds: list | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        """Every option error, before any work, as one line naming the option and what would work."""
        if not self.inputs:
            raise OptionError("inputs", "is empty: give at least one JSONL file")
        for path in self.inputs:
            if os.path.isdir(path):
                raise OptionError("inputs", f"{path} is a directory; give the JSONL files in it")
            if not os.path.isfile(path):
                raise OptionError("inputs", f"{path}: no such file")
            if not os.access(path, os.R_OK):
                raise OptionError("inputs", f"{path}: not readable")
        if self.ratios is not None:
            if len(self.ratios) != len(self.inputs):
                raise OptionError("ratios", f"has {len(self.ratios)} values for {len(self.inputs)} inputs; give one per "
                                  "input in {inputs}", mentions=("inputs",))
            if any(not (r >= 0 and np.isfinite(r)) for r in self.ratios):
                raise OptionError("ratios", f"{self.ratios}: each must be a finite number >= 0 (1 keeps an input as is)")
            if not any(self.ratios):
                raise OptionError("ratios", f"{self.ratios} are all 0, which keeps nothing; give at least one > 0")
        if self.max_record_bytes < 1:
            raise OptionError("max_record_bytes", f"must be at least 1, got {self.max_record_bytes}")
        if self.chat_template is not None and self.chat_template not in TEMPLATE_NAMES:
            raise OptionError("chat_template", f"{self.chat_template!r} is unknown; valid: {', '.join(TEMPLATE_NAMES)}")
        if self.packing not in packing.STRATEGIES:
            raise OptionError("packing", f"{self.packing!r} is unknown; valid: {', '.join(packing.STRATEGIES)}")
        if self.seq_length < 2:
            raise OptionError("seq_length", f"must be at least 2, got {self.seq_length}")
        if self.seq_length > MAX_SEQ_LENGTH:
            raise OptionError("seq_length", f"must be at most 2**31-1 ({MAX_SEQ_LENGTH}), got {self.seq_length}")
        if self.group_size < 1:
            raise OptionError("group_size", f"must be at least 1, got {self.group_size}")
        self._validate_for_kind(self.record_kind())
        if not 0 <= self.max_reject_fraction <= 1:
            raise OptionError("max_reject_fraction", f"must be in [0, 1], got {self.max_reject_fraction}")
        if self.workers < 1:
            raise OptionError("workers", f"must be at least 1, got {self.workers}")
        cpus = available_cpus()
        if self.workers > cpus:
            raise OptionError("workers", f"is {self.workers}, but this process may use {cpus} CPUs; give at most {cpus}")
        if self.shard is not None:
            shards.check_shard(*self.shard)
        if self.shard_block_lines < 1:
            raise OptionError("shard_block_lines", f"must be at least 1, got {self.shard_block_lines}")
        prefix = self.output_prefix
        if prefix.endswith(("/", os.sep)):
            raise OptionError("output_prefix", f"{prefix} ends with a slash; it names files, not a directory: give "
                              f"e.g. {prefix.rstrip('/' + os.sep) or '.'}/dataset")
        if os.path.isdir(prefix):
            raise OptionError("output_prefix", f"{prefix} is a directory; give a prefix of files in it, e.g. {prefix}/dataset")
        out_dir = Path(prefix).parent
        if not out_dir.is_dir():
            raise OptionError("output_prefix", f"{prefix}: directory {out_dir} does not exist")
        self._check_outputs_spare_inputs()
        self.check_prefix_free()

    def input_kinds(self) -> list[tuple[str | None, int | None]]:
        """Per input: its kind of record and the first line that shows it ((None, None): no record has a kind)."""
        if self._kinds is None:
            self._kinds = [input_kind(path, self.max_record_bytes) for path in self.inputs]
        return self._kinds

    def record_kind(self) -> str:
        """The one kind of record of all inputs (CHAT when none has a recognisable record: all are rejects)."""
        found = {}
        for path, (kind, line) in zip(self.inputs, self.input_kinds()):
            if kind is not None:
                found.setdefault(kind, (path, line))
        if len(found) > 1:
            (a, (a_path, a_line)), (b, (b_path, b_line)) = sorted(found.items(), key=lambda kv: RECORD_ORDER[kv[0]])[:2]
            raise OptionError("inputs", f"mix {a} records ({a_path}, line {a_line}) and {b} records "
                              f"({b_path}, line {b_line}): one run makes one kind of dataset; preprocess each "
                              "kind into its own prefix and mix them in training (data.path=[A, B], "
                              "data.weights=[...])")
        return next(iter(found), CHAT)

    def _validate_for_kind(self, kind: str) -> None:
        """The options that depend on the kind of record: chats need a template, documents take the piece options."""
        example = next((p for p, (k, _) in zip(self.inputs, self.input_kinds()) if k == kind), self.inputs[0])
        policies = OVERLENGTH_POLICIES if kind == TEXT else OVERLENGTH_POLICIES[:2]
        if kind == PREFERENCE and self.overlength in ("truncate", "split"):
            raise OptionError("overlength", f"{self.overlength} cannot apply to preference records ({example}): a "
                              "group (prompt + every response) is packed whole, and cutting it would cut the prompt "
                              "or drop answers; only drop (the default) is valid: longer groups are rejected "
                              "(group_too_long), so raise {seq_length} to keep them", mentions=("seq_length",))
        if self.overlength is not None and self.overlength not in policies:
            raise OptionError("overlength", f"{self.overlength!r} is unknown; valid: {', '.join(policies)}"
                              + (" (split is for text records)" if self.overlength == "split" else ""))
        if kind in (CHAT, PREFERENCE):
            what = "chat" if kind == CHAT else "preference"
            if self.chat_template is None:
                raise OptionError("chat_template", f"is needed for {what} records ({example}); valid: "
                                  f"{', '.join(TEMPLATE_NAMES)}")
            for name, value, default in (("min_piece_length", self.min_piece_length, None),
                                         ("positions", self.positions, "restart")):
                if value != default:
                    raise OptionError(name, f"is for text records (documents cut into pieces); {example} "
                                      f"holds {'chats' if kind == CHAT else 'preference records'}, which are never "
                                      "cut: leave it out")
            return
        if self.chat_template is not None:
            raise OptionError("chat_template", f"is for chat records; {example} holds text records (BOS + text "
                              "+ EOS, loss on every token): leave it out")
        if self.positions not in POSITION_MODES:
            raise OptionError("positions", f"{self.positions!r} is unknown; valid: {', '.join(POSITION_MODES)}")
        if self.positions == "continue" and self.resolved_overlength() != "split":
            raise OptionError("positions", "continue needs {overlength} split (the pieces of one document continue "
                              "each other's positions)", mentions=("overlength",))
        minimum = self.resolved_min_piece_length()
        if not 2 <= minimum <= self.seq_length:
            raise OptionError("min_piece_length", f"must be in [2, {self.seq_length}] (the seq_length; a piece of one "
                              f"token has nothing to train on), got {minimum}")

    def resolved_overlength(self) -> str:
        return self.overlength or ("split" if self.record_kind() == TEXT else "drop")

    def resolved_min_piece_length(self) -> int | None:
        if self.record_kind() != TEXT:
            return None
        return 2 if self.min_piece_length is None else self.min_piece_length

    def shard_prefix(self) -> str:
        """Where this run's shard part goes (shard runs only)."""
        return shards.shard_prefix(self.output_prefix, *self.shard)

    def _check_outputs_spare_inputs(self) -> None:
        check_outputs_spare_inputs(self.output_prefix, self.inputs)

    def check_prefix_free(self) -> None:
        """Refuse an existing dataset (a shard: its part) unless overwrite. A failed run's rejects file alone is no
        dataset."""
        if self.shard is not None:
            part = Path(self.shard_prefix())
            if part.exists() and not self.overwrite:
                raise OptionError("output_prefix", f"shard {self.shard[0]}/{self.shard[1]} of {self.output_prefix} "
                                  f"exists ({part}); set {{overwrite}} to replace it", mentions=("overwrite",))
            return
        check_dataset_free(self.output_prefix, self.overwrite)


def check_outputs_spare_inputs(prefix: str, inputs: list[str]) -> None:
    """No output file may be an input: writing it would destroy the input (e.g. inputs x.json, prefix x)."""
    forms = {}
    for path in inputs:
        for form in (os.path.abspath(path), os.path.realpath(path)):
            forms.setdefault(form, path)
    outputs = fmt.all_files(prefix) + fmt.optional_files(prefix)
    for out in outputs + [fmt.lock_file(prefix)]:
        hit = forms.get(os.path.abspath(out)) or forms.get(os.path.realpath(out))
        if hit is None and out.exists():  # hard links, bind mounts
            hit = next((i for i in inputs if os.path.exists(i) and os.path.samefile(i, out)), None)
        if hit is not None:
            raise OptionError("output_prefix", f"{prefix} would write {out}, which is the input {hit}; "
                              "choose a prefix whose files are not among the {inputs}", mentions=("inputs",))


def check_dataset_free(prefix: str, overwrite: bool) -> None:
    """Refuse an existing dataset at `prefix` unless overwrite. A failed run's rejects file alone is no dataset."""
    existing = [str(p) for p in fmt.data_files(prefix) + [fmt.meta_file(prefix)] if p.exists()]
    if existing and not overwrite:
        raise OptionError("output_prefix", f"{prefix} exists ({existing[0]}); set {{overwrite}} to replace it",
                          mentions=("overwrite",))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as set by taskset or a batch scheduler)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class MergeOptions:
    output_prefix: str  # the dataset the shards' parts become (the --output-prefix the shards ran with)
    overwrite: bool = False
    keep_shards: bool = False  # keep the parts after the merge (default: removed once the dataset is published)
    progress: bool | None = None


@dataclass
class PreprocessResult:
    prefix: str  # the dataset's PREFIX, or a shard run's part directory
    metadata: dict  # the dataset's PREFIX.json; a shard run's: its counts and token totals
    seconds: float
    shard: tuple[int, int] | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.metadata["num_tokens"] / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------- the pipeline

def preprocess(opts: PreprocessOptions) -> PreprocessResult:
    """Run the whole pipeline (or, with opts.shard, pass 1 of one shard); raises MegalignError on bad options, a
    busy prefix or too many rejected records."""
    started = time.perf_counter()
    opts.validate()
    locked = opts.output_prefix if opts.shard is None else opts.shard_prefix()
    with writer.PrefixLock(locked):
        opts.check_prefix_free()  # again, holding the lock: a run that finished meanwhile may have written it
        writer.remove_stale(locked)
        if opts.shard is not None:
            return _shard_locked(opts, started)
        return _preprocess_locked(opts, started)


def _run_of(opts: PreprocessOptions, tokenizer) -> dict:
    """Every option and input property that decides the output: what the shards of one dataset must share, and
    what the finish (packing, writing, metadata) reads."""
    kind = opts.record_kind()
    if kind == TEXT:
        documents = DocumentEncoder(tokenizer).describe()  # a BOS/EOS the tokenizer lacks: fail now
    else:
        make_encoder(opts.chat_template, tokenizer)  # unknown template or missing special tokens: fail now
        documents = None
    token_dtype = optimal_token_dtype(tokenizer.vocab_size)
    return {
        "created_by": f"megalign {megalign.__version__}", "record_kind": kind,
        "input_paths": list(opts.inputs), "input_bytes": [os.path.getsize(p) for p in opts.inputs],
        "input_kinds": [list(k) for k in opts.input_kinds()],
        "ratios": [float(r) for r in (opts.ratios or [1.0] * len(opts.inputs))],
        "tokenizer_path": opts.tokenizer, "tokenizer": tokenizer.describe(), "token_dtype": np.dtype(token_dtype).name,
        "chat_template": opts.chat_template, "seq_length": opts.seq_length, "packing": opts.packing,
        "group_size": opts.group_size, "overlength": opts.resolved_overlength(),
        "min_piece_length": opts.resolved_min_piece_length(), "positions": opts.positions, "documents": documents,
        "max_record_bytes": opts.max_record_bytes, "max_reject_fraction": opts.max_reject_fraction,
        "seed": opts.seed, "shard_block_lines": opts.shard_block_lines,
    }


def _empty_counts(run: dict) -> list[InputCounts]:
    return [InputCounts(path, ratio, kind=run["record_kind"]) for path, ratio in zip(run["input_paths"], run["ratios"])]


def _preprocess_locked(opts: PreprocessOptions, started: float) -> PreprocessResult:
    run = _run_of(opts, load_tokenizer(opts.tokenizer))
    scratch = writer.make_private_dir(opts.output_prefix, "tmp")
    version = writer.make_private_dir(opts.output_prefix, "v")
    temp_prefix = str(version / Path(opts.output_prefix).name)
    store = SampleStore(scratch, np.dtype(run["token_dtype"]))
    try:
        counts = _empty_counts(run)
        with PartCollector(store, fmt.rejects_file(temp_prefix)) as collector:
            tokenize_records(run, counts, collector, opts.workers, progress=opts.progress)
        part = collector.finish(counts, run)
        store.close_for_reading()
        metadata = _finish(run, [part], opts.output_prefix, temp_prefix, opts.progress)
        writer.publish(version, opts.output_prefix, scratch)
    finally:
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if writer.current_version(opts.output_prefix) != version:  # not published (or the commit never came)
            shutil.rmtree(version, ignore_errors=True)
    return PreprocessResult(opts.output_prefix, metadata, time.perf_counter() - started)


def _shard_locked(opts: PreprocessOptions, started: float) -> PreprocessResult:
    """Pass 1 of one shard, published as its part at PREFIX.shard-I-of-N/ (complete, or absent)."""
    run = _run_of(opts, load_tokenizer(opts.tokenizer))
    destination = Path(opts.shard_prefix())
    scratch = writer.make_private_dir(str(destination), "tmp")
    store = SampleStore(scratch, np.dtype(run["token_dtype"]))
    try:
        counts = _empty_counts(run)
        with PartCollector(store, scratch / "rejects.jsonl") as collector:
            tokenize_records(run, counts, collector, opts.workers, shard=opts.shard, progress=opts.progress)
        part = collector.finish(counts, run, opts.shard)
        stats.reconcile(stats.total_counts(counts))
        store.close()
        shards.save_part(part, scratch)
        shards.publish_part(scratch, destination)
    finally:
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    lengths, loss = part.slots[part.samples[:, 0], 0], part.slots[part.samples[:, 0], 1]
    summary_meta = {"shard": list(opts.shard), "inputs": [c.as_dict() for c in counts],
                    "counts": stats.total_counts(counts),
                    "num_samples": len(lengths), "num_tokens": int(lengths.sum()), "num_loss_tokens": int(loss.sum())}
    return PreprocessResult(str(destination), summary_meta, time.perf_counter() - started, opts.shard)


def merge(opts: MergeOptions) -> PreprocessResult:
    """Passes 2 and 3 over the parts of every shard of opts.output_prefix: the dataset a single run makes."""
    started = time.perf_counter()
    prefix = opts.output_prefix
    if not Path(prefix).parent.is_dir():
        raise OptionError("output_prefix", f"{prefix}: directory {Path(prefix).parent} does not exist")
    with writer.PrefixLock(prefix), ExitStack() as held:
        directories = shards.find_shards(prefix)
        for d in directories:  # a shard still running (or rerunning) must not change under the merge
            held.enter_context(writer.PrefixLock(str(d)))
        check_dataset_free(prefix, opts.overwrite)
        writer.remove_stale(prefix)
        parts = []
        try:
            for d in directories:
                parts.append(shards.load_part(d))
            run = shards.check_same_run(parts, directories)
            check_outputs_spare_inputs(prefix, run["input_paths"])
            scratch = writer.make_private_dir(prefix, "tmp")
            version = writer.make_private_dir(prefix, "v")
            temp_prefix = str(version / Path(prefix).name)
            try:
                metadata = _finish(run, parts, prefix, temp_prefix, opts.progress)
                writer.publish(version, prefix, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                if writer.current_version(prefix) != version:
                    shutil.rmtree(version, ignore_errors=True)
        finally:
            for part in parts:
                part.close()
        if not opts.keep_shards:
            for d in directories:
                shutil.rmtree(d, ignore_errors=True)
    return PreprocessResult(prefix, metadata, time.perf_counter() - started)


def _finish(run: dict, parts: list[Part], prefix: str, temp_prefix: str, progress: bool | None) -> dict:
    """Passes 2 and 3: the counts, the rejects file, the packs and the data files of `parts` at temp_prefix;
    returns the metadata (written too). The same for one run's part and for the parts of its shards."""
    if run["record_kind"] == PREFERENCE:
        return _finish_groups(run, parts, prefix, temp_prefix, progress)
    token_dtype = np.dtype(run["token_dtype"]).type
    counts, totals = _count_and_check(run, parts, prefix, temp_prefix)

    sample_slots, slots = shards.sample_order(parts)
    lengths = slots[sample_slots, 0]
    packs = packing.pack(lengths, run["seq_length"], run["packing"], run["seed"], run["group_size"])
    store = parts[0].store if len(parts) == 1 else shards.MergedStores(parts)
    with tqdm(total=int(lengths.sum()), unit="tok", desc="write", disable=None if progress is None else not progress,
              unit_scale=True) as bar:
        max_token_id = writer.write_packs(temp_prefix, store, sample_slots, packs, token_dtype, on_pack=bar.update)
    in_file_order = np.concatenate([sample_slots[p] for p in packs]) if packs else np.zeros(0, np.int64)
    if run["positions"] == "continue":
        writer.write_position_offsets(temp_prefix, slots[in_file_order, 2])

    pack_lengths = np.array([int(lengths[p].sum()) for p in packs], dtype=np.int64)
    metadata = _metadata(run, counts, totals, lengths, pack_lengths, int(slots[sample_slots, 1].sum()))
    if run["record_kind"] == TEXT:
        ends = slots[sample_slots, 2] + lengths
        metadata["documents"]["max_position"] = int(ends.max()) if len(ends) else 0
    metadata["max_token_id"] = max_token_id
    metadata["files"] = writer.file_records(temp_prefix)
    fmt.meta_file(temp_prefix).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    return metadata


def _count_and_check(run: dict, parts: list[Part], prefix: str, temp_prefix: str):
    counts = shards.total_counts(parts)
    totals = stats.total_counts(counts)
    stats.reconcile(totals)
    rejects = fmt.rejects_file(temp_prefix)
    if [p.rejects for p in parts] != [rejects]:  # shards: their rejects, in a single run's order
        with open(rejects, "w", encoding="utf-8") as out:
            out.writelines(shards.merged_rejects(parts))
    _check_reject_fraction(run, totals, prefix, temp_prefix)
    return counts, totals


def _finish_groups(run: dict, parts: list[Part], prefix: str, temp_prefix: str, progress: bool | None) -> dict:
    """_finish for preference records: groups packed whole, the roles (and reference scores) written beside."""
    counts, totals = _count_and_check(run, parts, prefix, temp_prefix)
    sample_slots, slots, keys = shards.sample_order(parts, keys=True)
    roles = shards.slot_column(parts, "roles")[sample_slots]
    reference = shards.slot_column(parts, "reference_logps")[sample_slots]
    has_reference = _check_reference_everywhere(run, roles, reference, keys)
    lengths = slots[sample_slots, 0]
    starts, group_lengths = preference.group_starts_and_lengths(roles, lengths)
    group_packs = packing.pack(group_lengths, run["seq_length"], run["packing"], run["seed"], run["group_size"])
    packs = preference.expand_groups(group_packs, starts, len(lengths))
    store = parts[0].store if len(parts) == 1 else shards.MergedStores(parts)
    with tqdm(total=int(lengths.sum()), unit="tok", desc="write", disable=None if progress is None else not progress,
              unit_scale=True) as bar:
        max_token_id = writer.write_packs(temp_prefix, store, sample_slots, packs, token_dtype=np.dtype(
            run["token_dtype"]).type, on_pack=bar.update)
    in_file_order = np.concatenate([np.asarray(p, np.int64) for p in packs]) if packs else np.zeros(0, np.int64)
    writer.write_roles(temp_prefix, roles[in_file_order])
    if has_reference:
        writer.write_reference_logps(temp_prefix, reference[in_file_order])

    pack_lengths = np.array([int(lengths[p].sum()) for p in packs], dtype=np.int64)
    metadata = _metadata(run, counts, totals, lengths, pack_lengths, int(slots[sample_slots, 1].sum()))
    responses = np.diff(np.append(starts, len(roles))) - 1
    prompt_tokens = int(lengths[starts].sum())
    metadata["format_version"] = fmt.PREFERENCE_FORMAT_VERSION
    metadata["preference"] = {
        "groups": len(starts),
        "roles": {"prompt": 0, "chosen": 1, "rejected": "2 + j"},
        "responses_per_group": {str(k): int(v) for k, v in zip(*np.unique(responses, return_counts=True))},
        "prompt_tokens": prompt_tokens,
        "response_tokens": int(lengths.sum()) - prompt_tokens,
        "reference_logps": has_reference,
        "group_length_histogram": stats.length_histogram(group_lengths, run["seq_length"]),
    }
    metadata["max_token_id"] = max_token_id
    metadata["files"] = writer.file_records(temp_prefix)
    fmt.meta_file(temp_prefix).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    return metadata


def _check_reference_everywhere(run: dict, roles: np.ndarray, reference: np.ndarray, keys: np.ndarray) -> bool:
    """Whether the dataset has reference scores: every response has one, or none has; else an error naming a
    record of each sort."""
    responses = roles != 0
    has = ~np.isnan(reference) & responses
    if not has.any():
        return False
    lacking = responses & ~has
    if lacking.any():
        (i, line), (j, other) = keys[np.argmax(lacking)], keys[np.argmax(has)]
        raise MegalignError(f"{run['input_paths'][i]} line {line} has no reference_logps, but "
                            f"{run['input_paths'][j]} line {other} has: give every preference record its reference "
                            "scores (one per response), or none")
    return True


def _check_reject_fraction(run: dict, totals: dict, prefix: str, temp_prefix: str) -> None:
    rejected = sum(totals["rejected"].values())
    considered = totals["read"] - totals["sampled_out"]
    limit = run["max_reject_fraction"]
    if considered == 0:
        raise MegalignError(f"no records to keep: the inputs {run['input_paths']} hold {totals['read']} records "
                            f"and the ratios sampled out {totals['sampled_out']}")
    if rejected == considered or rejected / considered > limit:
        os.replace(fmt.rejects_file(temp_prefix), fmt.rejects_file(prefix))  # the evidence stays
        reasons = ", ".join(f"{k}: {v}" for k, v in totals["rejected"].items())
        fix = {CHAT: "set {overlength} truncate", TEXT: "set {overlength} split",
               PREFERENCE: "raise {seq_length} for group_too_long"}[run["record_kind"]]
        raise OptionError(
            "max_reject_fraction",
            f"{limit} is exceeded: {rejected} of {considered} records rejected "
            f"({rejected / considered:.2%}; {reasons}); see {fmt.rejects_file(prefix)}. Fix the input, "
            f"or raise {{max_reject_fraction}} (or {fix}) if that is expected",
            mentions=("max_reject_fraction", "overlength", "seq_length"))


def _metadata(run: dict, counts, totals, lengths, pack_lengths, loss_tokens) -> dict:
    num_tokens = int(lengths.sum())
    seq_length = run["seq_length"]
    meta = {
        "format_version": fmt.FORMAT_VERSION,
        "created_by": run["created_by"],
        "tokenizer": run["tokenizer"],
        "token_dtype": run["token_dtype"],
        "record_kind": run["record_kind"],
        "chat_template": run["chat_template"],
        "seq_length": seq_length,
        "packing": {"strategy": run["packing"], "seed": run["seed"],
                    **({"group_size": run["group_size"]} if run["packing"] == "sorted" else {})},
        "overlength": run["overlength"],
    }
    if run["record_kind"] == TEXT:
        meta["documents"] = {**run["documents"], "min_piece_length": run["min_piece_length"],
                             "positions": run["positions"]}
    meta.update({
        "inputs": [c.as_dict() for c in counts],
        "counts": totals,
        "num_samples": len(lengths),
        "num_packs": len(pack_lengths),
        "num_tokens": num_tokens,
        "num_loss_tokens": loss_tokens,
        "packing_efficiency": round(num_tokens / max(1, len(pack_lengths) * seq_length), 6),
        "packs_lower_bound": packing.lower_bound(lengths, seq_length),
        "length_histogram": stats.length_histogram(lengths, seq_length),
        "pack_fill_histogram": stats.pack_fill_histogram(pack_lengths, seq_length),
    })
    return meta


def summary(result: PreprocessResult) -> str:
    m, c = result.metadata, result.metadata["counts"]
    rejected = sum(c["rejected"].values())
    reasons = ", ".join(f"{k}: {v}" for k, v in c["rejected"].items())
    if "samples" in c:  # documents: a kept record may be several samples
        kept = (f"kept {c['kept']} documents (duplicated {c['duplicated']}, truncated {c['truncated']}) as "
                f"{c['samples']} samples ({c['split']} documents cut into pieces, {c['tails_dropped']} tails dropped)")
    elif "preference" in m:
        g = m["preference"]
        kept = (f"kept {c['kept']} groups (duplicated {c['duplicated']}) as {m['num_samples']} samples: prompts "
                f"{g['prompt_tokens']} tokens, responses {g['response_tokens']}")
    else:
        kept = f"kept {c['kept']} samples (duplicated {c['duplicated']}, truncated {c['truncated']})"
    records = f"read {c['read']}, {kept}, sampled out {c['sampled_out']}, rejected {rejected}"
    tokens = (f"tokens: {m['num_tokens']} ({m['num_loss_tokens']} targets) in {result.seconds:.1f} s, "
              f"{result.tokens_per_second:,.0f} tokens/s")
    if result.shard is not None:
        i, n = result.shard
        return "\n".join([
            f"wrote shard {i}/{n} to {result.prefix}; once all {n} shards are done, join them with "
            f"tools/merge_data.py --output-prefix {result.prefix.rsplit('.shard-', 1)[0]}",
            f"records of this shard: {records}" + (f" ({reasons})" if rejected else ""), tokens])
    extra = [f"{result.prefix}{s}" for s in fmt.OPTIONAL_SUFFIXES if s in m["files"]]
    offsets = f" and {', '.join(extra)}" if extra else ""
    return "\n".join([
        f"wrote {result.prefix}.{{bin,idx,json}} and {result.prefix}{fmt.LOSS_MASK_SUFFIX}.{{bin,idx}}{offsets}",
        f"records: {records}" + (f" ({reasons}; see {result.prefix}{fmt.REJECTS_SUFFIX})" if rejected else ""),
        f"packs: {m['num_packs']} x {m['seq_length']} ({m['packing']['strategy']}), lower bound {m['packs_lower_bound']}, "
        f"efficiency {m['packing_efficiency']:.2%}",
        tokens,
    ])
