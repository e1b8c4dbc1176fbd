"""JSONL chats -> packed, indexed binaries (format v1). The library behind tools/preprocess_data.py.

Three passes, memory bounded by the number of samples (lengths), never by the number of tokens:
  1. read lines, decide each record's copies from the mixing ratios (seeded per record), and in worker
     processes parse, validate, apply the chat template and tokenize; spill kept samples to a scratch store,
     rejected records to PREFIX.rejects.jsonl
  2. pack the sample lengths
  3. write the packs (megatron-core IndexedDatasetBuilder) and the metadata into a new version directory, then
     publish it with one atomic rename: PREFIX is the previous complete dataset or the new one, never neither
     (writer.py describes the layout).
Records are handed out in fixed-size chunks and collected in order, so the output is byte-identical for any
number of workers.

A run holds PREFIX.lock throughout, so a second run on the prefix fails instead of mixing files; holding it, a
run removes the version and scratch directories that killed runs left. A bad record is a rejected record with
its reason, never the end of the run; a file that cannot be read (a truncated .gz) is a MegalignError.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import megalign
from megalign.data import format as fmt
from megalign.data import packing, stats, writer
from megalign.data.records import OversizedLine, RecordRejected, RejectReason, open_lines, parse_record
from megalign.data.sample_store import SampleStore
from megalign.data.templates import TEMPLATE_NAMES, make_encoder
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError, OptionError

OVERLENGTH_POLICIES = ("drop", "truncate")
CHUNK_RECORDS = 64
CHUNK_BYTES = 4 << 20
MAX_SEQ_LENGTH = 2**31 - 1  # megatron's .idx stores sequence lengths as int32


@dataclass
class PreprocessOptions:
    inputs: list[str]
    tokenizer: str
    chat_template: str
    seq_length: int
    output_prefix: str
    packing: str = "bfd"
    ratios: list[float] | None = None  # per input: expected copies of each record (0.5 keeps half, 2 doubles)
    group_size: int = 8  # samples per group for `sorted`
    overlength: str = "drop"
    max_reject_fraction: float = 0.01
    workers: int = 1
    seed: int = 1234
    max_record_bytes: int = 64 << 20  # a longer line is rejected unread (memory stays bounded)
    overwrite: bool = False
    progress: bool | None = None  # None: only on a terminal

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
        if self.chat_template not in TEMPLATE_NAMES:
            raise OptionError("chat_template", f"{self.chat_template!r} is unknown; valid: {', '.join(TEMPLATE_NAMES)}")
        if self.packing not in packing.STRATEGIES:
            raise OptionError("packing", f"{self.packing!r} is unknown; valid: {', '.join(packing.STRATEGIES)}")
        if self.seq_length < 2:
            raise OptionError("seq_length", f"must be at least 2, got {self.seq_length}")
        if self.seq_length > MAX_SEQ_LENGTH:
            raise OptionError("seq_length", f"must be at most 2**31-1 ({MAX_SEQ_LENGTH}), got {self.seq_length}")
        if self.group_size < 1:
            raise OptionError("group_size", f"must be at least 1, got {self.group_size}")
        if self.overlength not in OVERLENGTH_POLICIES:
            raise OptionError("overlength", f"{self.overlength!r} is unknown; valid: {', '.join(OVERLENGTH_POLICIES)}")
        if not 0 <= self.max_reject_fraction <= 1:
            raise OptionError("max_reject_fraction", f"must be in [0, 1], got {self.max_reject_fraction}")
        if self.workers < 1:
            raise OptionError("workers", f"must be at least 1, got {self.workers}")
        cpus = available_cpus()
        if self.workers > cpus:
            raise OptionError("workers", f"is {self.workers}, but this process may use {cpus} CPUs; give at most {cpus}")
        if self.max_record_bytes < 1:
            raise OptionError("max_record_bytes", f"must be at least 1, got {self.max_record_bytes}")
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

    def _check_outputs_spare_inputs(self) -> None:
        """No output file may be an input: writing it would destroy the input (e.g. inputs x.json, prefix x)."""
        inputs = {}
        for path in self.inputs:
            for form in (os.path.abspath(path), os.path.realpath(path)):
                inputs.setdefault(form, path)
        for out in fmt.all_files(self.output_prefix) + [fmt.lock_file(self.output_prefix)]:
            hit = inputs.get(os.path.abspath(out)) or inputs.get(os.path.realpath(out))
            if hit is None and out.exists():  # hard links, bind mounts
                hit = next((i for i in self.inputs if os.path.samefile(i, out)), None)
            if hit is not None:
                raise OptionError("output_prefix", f"{self.output_prefix} would write {out}, which is the input {hit}; "
                                  "choose a prefix whose files are not among the {inputs}", mentions=("inputs",))

    def check_prefix_free(self) -> None:
        """Refuse an existing dataset unless overwrite. A failed run's rejects file alone is no dataset."""
        existing = [str(p) for p in fmt.data_files(self.output_prefix) + [fmt.meta_file(self.output_prefix)] if p.exists()]
        if existing and not self.overwrite:
            raise OptionError("output_prefix", f"{self.output_prefix} exists ({existing[0]}); set {{overwrite}} to replace it",
                              mentions=("overwrite",))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as set by taskset or a batch scheduler)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class InputCounts:
    path: str
    ratio: float
    read: int = 0
    kept: int = 0
    duplicated: int = 0
    sampled_out: int = 0
    truncated: int = 0
    blank_lines: int = 0
    rejected: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("path", "ratio", "read", "kept", "duplicated", "sampled_out", "truncated", "blank_lines")}
        d["rejected"] = dict(sorted(self.rejected.items()))
        return d


@dataclass
class PreprocessResult:
    prefix: str
    metadata: dict
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.metadata["num_tokens"] / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------- pass 1: tokenize

def copies_of(seed: int, input_index: int, line_no: int, ratio: float) -> int:
    """How many times a record enters the dataset: floor(ratio), plus one with probability frac(ratio).

    Seeded per record, so the choice does not depend on chunking, worker count or the other records.
    """
    whole = int(ratio)
    fraction = ratio - whole
    if fraction == 0:
        return whole
    digest = hashlib.blake2b(f"{seed}:{input_index}:{line_no}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(digest, "little") / 2**64 < fraction)


_worker_state: dict = {}


def _init_worker(tokenizer_path: str, template: str, seq_length: int, overlength: str, token_dtype) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    # What a template may raise on one record's content (raise_exception, a missing key): that record's reject.
    record_errors = ()
    if template == "hf":
        import jinja2

        record_errors = (jinja2.exceptions.TemplateError,)
    _worker_state.update(encoder=make_encoder(template, tokenizer), seq_length=seq_length, overlength=overlength,
                         token_dtype=token_dtype, record_errors=record_errors)


def _encode_each(encoder, parsed: list, record_errors: tuple) -> list:
    """Samples of `parsed`, batched; when the template raises, one by one, with the error in a failed one's place."""
    try:
        return encoder.encode_many(parsed)
    except record_errors:
        pass
    samples = []
    for conv in parsed:
        try:
            samples.append(encoder.encode_many([conv])[0])
        except record_errors as e:
            samples.append(e)
    return samples


def _tokenize_chunk(chunk: list[tuple[int, int, bytes]]) -> list[tuple]:
    """(input, line, raw) records -> ("ok", input, line, tokens, packed mask bits, truncated)
    | ("reject", input, line, reason, detail)."""
    encoder, seq_length, overlength = _worker_state["encoder"], _worker_state["seq_length"], _worker_state["overlength"]
    outcomes: list = [None] * len(chunk)
    parsed, where = [], []
    for k, (input_index, line_no, raw) in enumerate(chunk):
        if isinstance(raw, OversizedLine):
            outcomes[k] = ("reject", input_index, line_no, RejectReason.TOO_LARGE.value,
                           f"{raw.size} bytes > max_record_bytes {raw.limit} (raise it if records this large are expected)")
            continue
        try:
            parsed.append(parse_record(raw))
            where.append(k)
        except RecordRejected as e:
            outcomes[k] = ("reject", input_index, line_no, e.reason.value, e.detail)
    for k, sample in zip(where, _encode_each(encoder, parsed, _worker_state["record_errors"])):
        input_index, line_no, _ = chunk[k]
        if isinstance(sample, Exception):
            detail = " ".join(f"the chat template raised {type(sample).__name__}: {sample}".split())
            outcomes[k] = ("reject", input_index, line_no, RejectReason.TEMPLATE_ERROR.value, detail[:500])
            continue
        tokens, mask, truncated = sample.tokens, sample.loss_mask, False
        if len(tokens) > seq_length:
            if overlength == "drop":
                outcomes[k] = ("reject", input_index, line_no, RejectReason.TOO_LONG.value,
                               f"{len(tokens)} tokens > seq_length {seq_length} (overlength truncate keeps a prefix)")
                continue
            tokens, mask, truncated = tokens[:seq_length], mask[:seq_length], True
        if not mask[1:].any():  # the first token is never a target
            outcomes[k] = ("reject", input_index, line_no, RejectReason.NO_LOSS_TOKENS.value,
                           "no assistant token left to train on" + (" after truncation" if truncated else ""))
            continue
        # Small on the wire back to the main process: tokens in the file's dtype, the mask as bits.
        outcomes[k] = ("ok", input_index, line_no, tokens.astype(_worker_state["token_dtype"]), np.packbits(mask),
                       truncated)
    return outcomes


def _chunks(opts: PreprocessOptions, counts: list[InputCounts]) -> Iterator[tuple[list, list[int]]]:
    """Chunks of records to tokenize, each with the copies of its records. Counts reads and ratio drops."""
    chunk, copies, size = [], [], 0
    for input_index, path in enumerate(opts.inputs):
        c = counts[input_index]
        for line_no, raw in enumerate(open_lines(path, opts.max_record_bytes), start=1):
            if isinstance(raw, bytes) and not raw.strip():
                c.blank_lines += 1
                continue
            c.read += 1
            n = copies_of(opts.seed, input_index, line_no, c.ratio)
            if n == 0:
                c.sampled_out += 1
                continue
            chunk.append((input_index, line_no, raw))
            copies.append(n)
            size += len(raw) if isinstance(raw, bytes) else 0
            if len(chunk) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield chunk, copies
                chunk, copies, size = [], [], 0
    if chunk:
        yield chunk, copies


def _map_in_order(opts: PreprocessOptions, token_dtype, chunks: Iterator[tuple[list, list[int]]]) -> Iterator[tuple[list, list[int]]]:
    """Tokenize chunks in worker processes (or in-process for one worker), yielding results in input order."""
    init_args = (opts.tokenizer, opts.chat_template, opts.seq_length, opts.overlength, token_dtype)
    if opts.workers == 1:
        _init_worker(*init_args)
        for chunk, copies in chunks:
            yield _tokenize_chunk(chunk), copies
        return
    # spawn: workers import only the tokenizer stack (never torch), and no Rust thread pool is forked.
    # A bounded window of chunks in flight keeps memory flat (Pool.imap would read the whole input ahead).
    ctx = multiprocessing.get_context("spawn")
    in_flight: deque = deque()
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=init_args) as pool:
        for chunk, copies in chunks:
            in_flight.append((pool.apply_async(_tokenize_chunk, (chunk,)), copies))
            if len(in_flight) >= 4 * opts.workers:
                result, copies = in_flight.popleft()
                yield result.get(), copies
        while in_flight:
            result, copies = in_flight.popleft()
            yield result.get(), copies


# ---------------------------------------------------------------------------------------------- the pipeline

def preprocess(opts: PreprocessOptions) -> PreprocessResult:
    """Run the whole pipeline; raises MegalignError on bad options, a busy prefix or too many rejected records."""
    started = time.perf_counter()
    opts.validate()
    with writer.PrefixLock(opts.output_prefix):
        opts.check_prefix_free()  # again, holding the lock: a run that finished meanwhile may have written it
        writer.remove_stale(opts.output_prefix)
        return _preprocess_locked(opts, started)


def _preprocess_locked(opts: PreprocessOptions, started: float) -> PreprocessResult:
    tokenizer = load_tokenizer(opts.tokenizer)
    make_encoder(opts.chat_template, tokenizer)  # unknown template or missing special tokens: fail now
    # The writer needs megatron-core (and torch): a few seconds of imports, done while the workers tokenize.
    importing = threading.Thread(target=importlib.import_module, args=("megatron.core.datasets.indexed_dataset",))
    importing.start()
    token_dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32  # megatron's DType.optimal_dtype rule
    ratios = opts.ratios or [1.0] * len(opts.inputs)
    counts = [InputCounts(path, float(r)) for path, r in zip(opts.inputs, ratios)]

    scratch = writer.make_private_dir(opts.output_prefix, "tmp")
    version = writer.make_private_dir(opts.output_prefix, "v")
    temp_prefix = str(version / Path(opts.output_prefix).name)
    store = SampleStore(scratch, token_dtype)
    try:
        sample_slots, slot_lengths, slot_loss_tokens = _tokenize_all(opts, counts, store, temp_prefix)
        importing.join()
        from megatron.core.datasets.indexed_dataset import DType

        assert DType.optimal_dtype(tokenizer.vocab_size) == token_dtype, "megatron changed its token dtype rule"
        totals = _total_counts(counts)
        stats.reconcile(totals)
        _check_reject_fraction(opts, totals, temp_prefix)

        lengths = slot_lengths[sample_slots]
        packs = packing.pack(lengths, opts.seq_length, opts.packing, opts.seed, opts.group_size)
        store.close_for_reading()
        with tqdm(total=int(lengths.sum()), unit="tok", desc="write", disable=_no_progress(opts), unit_scale=True) as bar:
            max_token_id = writer.write_packs(temp_prefix, store, sample_slots, packs, token_dtype,
                                              on_pack=bar.update)
        store.close()

        pack_lengths = np.array([int(lengths[p].sum()) for p in packs], dtype=np.int64)
        metadata = _metadata(opts, tokenizer, token_dtype, counts, totals, lengths, pack_lengths,
                             int(slot_loss_tokens[sample_slots].sum()))
        metadata["max_token_id"] = max_token_id
        metadata["files"] = writer.file_records(temp_prefix)
        fmt.meta_file(temp_prefix).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
        writer.publish(version, opts.output_prefix, scratch)
    finally:
        importing.join()
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if writer.current_version(opts.output_prefix) != version:  # not published (or the commit never came)
            shutil.rmtree(version, ignore_errors=True)
    return PreprocessResult(opts.output_prefix, metadata, time.perf_counter() - started)


def _no_progress(opts: PreprocessOptions) -> bool | None:
    return None if opts.progress is None else not opts.progress


def _tokenize_all(opts, counts, store, temp_prefix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1. Returns, per sample, its store slot; per slot, its length and number of loss targets."""
    # 8 bytes per sample (array, not list): memory grows with the number of samples only, and slowly.
    sample_slots, slot_lengths, slot_loss_tokens = array("q"), array("q"), array("q")
    with open(fmt.rejects_file(temp_prefix), "w", encoding="utf-8") as rejects, \
            tqdm(unit="rec", desc="tokenize", disable=_no_progress(opts)) as bar:
        for outcomes, copies in _map_in_order(opts, store.token_dtype, _chunks(opts, counts)):
            for outcome, n in zip(outcomes, copies):
                kind, input_index, line_no = outcome[:3]
                c = counts[input_index]
                if kind == "reject":
                    reason, detail = outcome[3:]
                    c.rejected[reason] += 1
                    rejects.write(json.dumps({"input": c.path, "line": line_no, "reason": reason, "detail": detail}) + "\n")
                    continue
                tokens, mask_bits, truncated = outcome[3:]
                mask = np.unpackbits(mask_bits, count=len(tokens))
                slot = store.append(tokens, mask)
                slot_lengths.append(len(tokens))
                slot_loss_tokens.append(int(mask[1:].sum()))
                sample_slots.extend([slot] * n)
                c.kept += n
                c.duplicated += n - 1
                c.truncated += truncated
            bar.update(len(outcomes))
    return tuple(np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)
                 for a in (sample_slots, slot_lengths, slot_loss_tokens))


def _total_counts(counts: list[InputCounts]) -> dict:
    rejected = Counter()
    for c in counts:
        rejected.update(c.rejected)
    total = {k: sum(getattr(c, k) for c in counts)
             for k in ("read", "kept", "duplicated", "sampled_out", "truncated", "blank_lines")}
    total["rejected"] = dict(sorted(rejected.items()))
    return total


def _check_reject_fraction(opts: PreprocessOptions, totals: dict, temp_prefix: str) -> None:
    rejected = sum(totals["rejected"].values())
    considered = totals["read"] - totals["sampled_out"]
    if considered == 0:
        raise MegalignError(f"no records to keep: the inputs {opts.inputs} hold {totals['read']} records "
                            f"and the ratios sampled out {totals['sampled_out']}")
    if rejected == considered or rejected / considered > opts.max_reject_fraction:
        os.replace(fmt.rejects_file(temp_prefix), fmt.rejects_file(opts.output_prefix))  # the evidence stays
        reasons = ", ".join(f"{k}: {v}" for k, v in totals["rejected"].items())
        raise OptionError(
            "max_reject_fraction",
            f"{opts.max_reject_fraction} is exceeded: {rejected} of {considered} records rejected "
            f"({rejected / considered:.2%}; {reasons}); see {fmt.rejects_file(opts.output_prefix)}. Fix the input, "
            "or raise {max_reject_fraction} (or set {overlength} truncate) if that is expected",
            mentions=("max_reject_fraction", "overlength"))


def _metadata(opts, tokenizer, token_dtype, counts, totals, lengths, pack_lengths, loss_tokens) -> dict:
    num_tokens = int(lengths.sum())
    return {
        "format_version": fmt.FORMAT_VERSION,
        "created_by": f"megalign {megalign.__version__}",
        "tokenizer": tokenizer.describe(),
        "token_dtype": np.dtype(token_dtype).name,
        "chat_template": opts.chat_template,
        "seq_length": opts.seq_length,
        "packing": {"strategy": opts.packing, "seed": opts.seed,
                    **({"group_size": opts.group_size} if opts.packing == "sorted" else {})},
        "overlength": opts.overlength,
        "inputs": [c.as_dict() for c in counts],
        "counts": totals,
        "num_samples": len(lengths),
        "num_packs": len(pack_lengths),
        "num_tokens": num_tokens,
        "num_loss_tokens": loss_tokens,
        "packing_efficiency": round(num_tokens / max(1, len(pack_lengths) * opts.seq_length), 6),
        "packs_lower_bound": packing.lower_bound(lengths, opts.seq_length),
        "length_histogram": stats.length_histogram(lengths, opts.seq_length),
        "pack_fill_histogram": stats.pack_fill_histogram(pack_lengths, opts.seq_length),
    }


def summary(result: PreprocessResult) -> str:
    m, c = result.metadata, result.metadata["counts"]
    rejected = sum(c["rejected"].values())
    lines = [
        f"wrote {result.prefix}.{{bin,idx,json}} and {result.prefix}{fmt.LOSS_MASK_SUFFIX}.{{bin,idx}}",
        f"records: read {c['read']}, kept {c['kept']} samples (duplicated {c['duplicated']}, "
        f"truncated {c['truncated']}), sampled out {c['sampled_out']}, rejected {rejected}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in c['rejected'].items())}; see {result.prefix}{fmt.REJECTS_SUFFIX})"
           if rejected else ""),
        f"packs: {m['num_packs']} x {m['seq_length']} ({m['packing']['strategy']}), lower bound {m['packs_lower_bound']}, "
        f"efficiency {m['packing_efficiency']:.2%}",
        f"tokens: {m['num_tokens']} ({m['num_loss_tokens']} targets) in {result.seconds:.1f} s, "
        f"{result.tokens_per_second:,.0f} tokens/s",
    ]
    return "\n".join(lines)
