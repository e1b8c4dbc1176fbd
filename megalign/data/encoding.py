"""Pass 1 of preprocessing: records -> samples in worker processes, collected in input order into a part.

The main process reads lines, decides each record's copies from the mixing ratios (seeded per record) and hands
records out in fixed-size chunks; workers parse and validate them, apply the chat template (chat records, and
each answer of a preference record: preference.py) or BOS/EOS (text records) and tokenize; results come back in order, so the output is byte-identical for any number
of workers. The main process spills kept samples to the part's store (a document longer than the pack as its
pieces, documents.py; a preference record as its group: prompt, chosen, rejected 0 .. M-1, one slot each, with
their roles and reference scores) and rejected records, with their reasons, to the part's rejects file.

A record of the other kind than its input's is an error naming the file and the line (one input holds one kind);
every other bad record is a rejected record, never the end of the run.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megalign.data import shards
from megalign.data.documents import DocumentEncoder, piece_lengths
from megalign.data.preference import group_of, preference_of
from megalign.data.records import (KIND_KEYS, PREFERENCE, TEXT, OversizedLine, RecordRejected, RejectReason,
                                   conversation_of, decode_record, document_of, open_lines, record_kind)
from megalign.data.shards import PartCollector
from megalign.data.stats import InputCounts
from megalign.data.templates import make_encoder
from megalign.data.tokenizer import load_tokenizer
from megalign.errors import MegalignError

CHUNK_RECORDS = 64
CHUNK_BYTES = 4 << 20


def copies_of(seed: int, input_index: int, line_no: int, ratio: float) -> int:
    """How many times a record enters the dataset: floor(ratio), plus one with probability frac(ratio).

    Seeded per record, so the choice does not depend on chunking, worker count, sharding or the other records.
    """
    whole = int(ratio)
    fraction = ratio - whole
    if fraction == 0:
        return whole
    digest = hashlib.blake2b(f"{seed}:{input_index}:{line_no}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(digest, "little") / 2**64 < fraction)


# ---------------------------------------------------------------------------------------------- workers

_worker_state: dict = {}


def _init_worker(tokenizer_path: str, kind: str, template: str | None, seq_length: int, overlength: str,
                 token_dtype) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    # What a template may raise on one record's content (raise_exception, a missing key): that record's reject.
    record_errors = ()
    if template == "hf":
        import jinja2

        record_errors = (jinja2.exceptions.TemplateError,)
    encoder = DocumentEncoder(tokenizer) if kind == TEXT else make_encoder(template, tokenizer)
    _worker_state.update(kind=kind, encoder=encoder, seq_length=seq_length, overlength=overlength,
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


def _reject(input_index: int, line_no: int, reason: RejectReason, detail: str) -> tuple:
    return ("reject", input_index, line_no, reason.value, detail)


def _parse_chunk(chunk: list[tuple[int, int, bytes]], kind: str) -> tuple[list, list, list]:
    """Decode and validate the records of a chunk: (outcomes with rejects filled in, parsed contents, their
    places in the chunk)."""
    outcomes: list = [None] * len(chunk)
    parsed, where = [], []
    content_of = {TEXT: document_of, PREFERENCE: preference_of}.get(kind, conversation_of)
    for k, (input_index, line_no, raw) in enumerate(chunk):
        if isinstance(raw, OversizedLine):
            outcomes[k] = _reject(input_index, line_no, RejectReason.TOO_LARGE,
                                  f"{raw.size} bytes > max_record_bytes {raw.limit} (raise it if records this large "
                                  "are expected)")
            continue
        try:
            record = decode_record(raw)
            found = record_kind(record)
            if found is not None and found != kind:
                outcomes[k] = ("kind", input_index, line_no, found)
                continue
            parsed.append(content_of(record))
            where.append(k)
        except RecordRejected as e:
            outcomes[k] = _reject(input_index, line_no, e.reason, e.detail)
    return outcomes, parsed, where


def _tokenize_chunk(chunk: list[tuple[int, int, bytes]]) -> list[tuple]:
    """(input, line, raw) records -> ("ok", input, line, tokens, packed mask bits or None (all ones), truncated)
    | ("group", input, line, tokens, lengths, reference scores or None) | ("reject", input, line, reason, detail)
    | ("kind", input, line, the record's kind)."""
    state = _worker_state
    outcomes, parsed, where = _parse_chunk(chunk, state["kind"])
    if state["kind"] == PREFERENCE:
        conversations = [c for pref in parsed for c in pref.conversations()]
        _group_outcomes(chunk, outcomes, parsed, _encode_each(state["encoder"], conversations, state["record_errors"]),
                        where)
    elif state["kind"] == TEXT:
        _text_outcomes(chunk, outcomes, state["encoder"].encode_many(parsed, state["token_dtype"]), where)
    else:
        _chat_outcomes(chunk, outcomes, _encode_each(state["encoder"], parsed, state["record_errors"]), where)
    return outcomes


def _template_reject(input_index: int, line_no: int, error: Exception) -> tuple:
    detail = " ".join(f"the chat template raised {type(error).__name__}: {error}".split())
    return _reject(input_index, line_no, RejectReason.TEMPLATE_ERROR, detail[:500])


def _group_outcomes(chunk, outcomes: list, parsed: list, samples: list, where: list[int]) -> None:
    """A preference record's answers' samples -> its group, or a reject (the group must fit one pack whole)."""
    seq_length, start = _worker_state["seq_length"], 0
    for k, pref in zip(where, parsed):
        input_index, line_no, _ = chunk[k]
        mine, start = samples[start:start + len(pref.answers)], start + len(pref.answers)
        failed = next((s for s in mine if isinstance(s, Exception)), None)
        if failed is not None:
            outcomes[k] = _template_reject(input_index, line_no, failed)
            continue
        try:
            group = group_of(pref, mine)
        except RecordRejected as e:
            outcomes[k] = _reject(input_index, line_no, e.reason, e.detail)
            continue
        if len(group.tokens) > seq_length:
            outcomes[k] = _reject(input_index, line_no, RejectReason.GROUP_TOO_LONG,
                                  f"prompt {group.lengths[0]} + responses {sum(group.lengths[1:])} = "
                                  f"{len(group.tokens)} tokens > seq_length {seq_length} (a group is packed whole)")
            continue
        outcomes[k] = ("group", input_index, line_no, group.tokens.astype(_worker_state["token_dtype"]), group.lengths,
                       group.reference_logps)


def _chat_outcomes(chunk, outcomes: list, samples: list, where: list[int]) -> None:
    seq_length, overlength = _worker_state["seq_length"], _worker_state["overlength"]
    for k, sample in zip(where, samples):
        input_index, line_no, _ = chunk[k]
        if isinstance(sample, Exception):
            outcomes[k] = _template_reject(input_index, line_no, sample)
            continue
        tokens, mask, truncated = sample.tokens, sample.loss_mask, False
        if len(tokens) > seq_length:
            if overlength == "drop":
                outcomes[k] = _reject(input_index, line_no, RejectReason.TOO_LONG,
                                      f"{len(tokens)} tokens > seq_length {seq_length} (overlength truncate keeps a "
                                      "prefix)")
                continue
            tokens, mask, truncated = tokens[:seq_length], mask[:seq_length], True
        if not mask[1:].any():  # the first token is never a target
            outcomes[k] = _reject(input_index, line_no, RejectReason.NO_LOSS_TOKENS,
                                  "no assistant token left to train on" + (" after truncation" if truncated else ""))
            continue
        # Small on the wire back to the main process: tokens in the file's dtype, the mask as bits.
        outcomes[k] = ("ok", input_index, line_no, tokens.astype(_worker_state["token_dtype"]), np.packbits(mask),
                       truncated)


def _text_outcomes(chunk, outcomes: list, documents: list[np.ndarray], where: list[int]) -> None:
    seq_length, overlength = _worker_state["seq_length"], _worker_state["overlength"]
    for k, tokens in zip(where, documents):
        input_index, line_no, _ = chunk[k]
        truncated = False
        if len(tokens) > seq_length and overlength != "split":
            if overlength == "drop":
                outcomes[k] = _reject(input_index, line_no, RejectReason.TOO_LONG,
                                      f"{len(tokens)} tokens > seq_length {seq_length} (overlength split cuts it into "
                                      "pieces)")
                continue
            tokens, truncated = tokens[:seq_length], True
        if len(tokens) < 2:  # the first token is never a target
            outcomes[k] = _reject(input_index, line_no, RejectReason.NO_LOSS_TOKENS,
                                  "a document of one token (BOS/EOS included) has nothing to train on")
            continue
        outcomes[k] = ("ok", input_index, line_no, tokens, None, truncated)


# ---------------------------------------------------------------------------------------------- main process

def _chunks(run: dict, counts: list[InputCounts], shard) -> Iterator[tuple[list, list[int]]]:
    """Chunks of this shard's records to tokenize, each with the copies of its records. Counts reads, blank lines
    and ratio drops of this shard's lines."""
    chunk, copies, size = [], [], 0
    line_index = 0  # over all inputs, blank lines included: the shards' blocks
    block_lines = run["shard_block_lines"]
    for input_index, path in enumerate(run["input_paths"]):
        c = counts[input_index]
        for line_no, raw in enumerate(open_lines(path, run["max_record_bytes"]), start=1):
            mine = shards.owns(line_index // block_lines, shard)
            line_index += 1
            if not mine:
                continue
            if isinstance(raw, bytes) and not raw.strip():
                c.blank_lines += 1
                continue
            c.read += 1
            n = copies_of(run["seed"], input_index, line_no, c.ratio)
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


def _map_in_order(run: dict, workers: int, chunks: Iterator[tuple[list, list[int]]]) -> Iterator[tuple[list, list[int]]]:
    """Tokenize chunks in worker processes (one worker: a thread of this process), yielding results in input order.

    One worker is a thread, not a process: the tokenizer releases the GIL while it encodes, so reading the input
    and storing samples overlap tokenizing, as they do with worker processes, without a process to start."""
    init_args = (run["tokenizer_path"], run["record_kind"], run["chat_template"], run["seq_length"], run["overlength"],
                 np.dtype(run["token_dtype"]).type)
    if workers == 1:
        pool = ThreadPoolExecutor(1, initializer=_init_worker, initargs=init_args)
        submit, get = pool.submit, Future.result
    else:
        # spawn: workers import only the tokenizer stack (never torch), and no Rust thread pool is forked.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)
        submit, get = (lambda fn, chunk: pool.apply_async(fn, (chunk,))), (lambda result: result.get())
    # A bounded window of chunks in flight keeps memory flat (Pool.imap would read the whole input ahead).
    in_flight: deque = deque()
    with pool:
        for chunk, copies in chunks:
            in_flight.append((submit(_tokenize_chunk, chunk), copies))
            if len(in_flight) >= 4 * workers:
                result, copies = in_flight.popleft()
                yield get(result), copies
        while in_flight:
            result, copies = in_flight.popleft()
            yield get(result), copies


def tokenize_records(run: dict, counts: list[InputCounts], collector: PartCollector, workers: int,
                     shard: tuple[int, int] | None = None, progress: bool | None = None) -> None:
    """Pass 1 over this shard's records (all of them without a shard): samples and rejects into `collector`."""
    continuing = run["positions"] == "continue"
    split = run["overlength"] == "split"
    with tqdm(unit="rec", desc="tokenize", disable=None if progress is None else not progress) as bar:
        for outcomes, copies in _map_in_order(run, workers, _chunks(run, counts, shard)):
            for outcome, n in zip(outcomes, copies):
                status, input_index, line_no = outcome[:3]
                c = counts[input_index]
                if status == "reject":
                    reason, detail = outcome[3:]
                    c.rejected[reason] += 1
                    collector.add_reject(input_index, line_no, {"input": c.path, "line": line_no, "reason": reason,
                                                                "detail": detail})
                    continue
                if status == "kind":
                    raise _mixed_kinds(run, input_index, line_no, outcome[3])
                if status == "group":
                    _add_group(collector, outcome, n)
                    c.kept += n
                    c.duplicated += n - 1
                    continue
                tokens, mask_bits, truncated = outcome[3:]
                if mask_bits is None:  # a document: its pieces
                    lengths, dropped = piece_lengths(len(tokens), run["seq_length"], run["min_piece_length"]) \
                        if split else ([len(tokens)], 0)
                    slots, start = [], 0
                    for length in lengths:
                        slots.append(collector.add_slot(tokens[start:start + length], None, length - 1,
                                                        start if continuing else 0))
                        start += length
                    c.split += n * (len(lengths) > 1)
                    c.samples += n * len(lengths)
                    c.tokens += n * sum(lengths)
                    c.tails_dropped += n * (dropped > 0)
                    c.tail_tokens_dropped += n * dropped
                else:
                    mask = np.unpackbits(mask_bits, count=len(tokens))
                    slots = [collector.add_slot(tokens, mask, int(mask[1:].sum()), 0)]
                collector.add_samples(slots, n, input_index, line_no)
                c.kept += n
                c.duplicated += n - 1
                c.truncated += truncated
            bar.update(len(outcomes))


def _add_group(collector: PartCollector, outcome: tuple, copies: int) -> None:
    """A group's samples: slot j has role j (groups.py: PROMPT 0, CHOSEN 1, REJECTED 2 + i), the prompt no loss."""
    _, input_index, line_no, tokens, lengths, reference = outcome
    slots, start = [], 0
    for role, length in enumerate(lengths):
        piece = tokens[start:start + length]
        start += length
        if role == 0:
            slots.append(collector.add_slot(piece, np.zeros(length, np.uint8), 0, 0, role=0))
        else:
            slots.append(collector.add_slot(piece, None, length, 0, role=role,
                                            reference=None if reference is None else reference[role - 1]))
    collector.add_samples(slots, copies, input_index, line_no)


def _mixed_kinds(run: dict, input_index: int, line_no: int, found: str) -> MegalignError:
    path, kind = run["input_paths"][input_index], run["record_kind"]
    first = run["input_kinds"][input_index][1]
    keys = KIND_KEYS[found]
    return MegalignError(
        f"{path} line {line_no}: a {found} record ({keys}) in an input of {kind} records (line {first} is one): one "
        f"input holds one kind of record; split the file by kind and preprocess each into its own dataset "
        "(training mixes datasets: data.path=[A, B], data.weights=[...])")

