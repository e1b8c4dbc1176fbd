"""On-disk formats v1 (chats, text) and v2 (preference groups): the files of a packed dataset PREFIX and how they
are checked.

  PREFIX.bin / PREFIX.idx                      megatron-core IndexedDataset of token ids: one sequence per
                                               sample, one document per pack
  PREFIX_loss_mask.bin / PREFIX_loss_mask.idx  the same structure, uint8, 1 where a token is a target
  PREFIX_position_offsets.npy                  text records with positions continue only: int64, one per
                                               sequence (in .idx order), where its position ids start
  PREFIX_roles.npy                             v2 (preference) only: int8, one per sequence (.idx order), its role
                                               in its group (data/groups.py: 0 prompt, 1 chosen, 2 + j rejected j);
                                               a group is consecutive sequences inside one document (pack)
  PREFIX_reference_logps.npy                   v2, when the records carry reference scores: float64 per sequence,
                                               the response's reference log-prob sum, NaN for prompts
  PREFIX.reference.npy                         v2, written by tools/score_reference.py (not preprocessing): float64
                                               per sequence, each response's reference log-prob sum, NaN for
                                               prompts; read when PREFIX_reference_logps.npy is absent
  PREFIX.reference.json                        what the scores were computed with: the model, the dataset's
                                               checksums (files of PREFIX.json: checked on reading), the layout
  PREFIX.json                                  metadata: version, tokenizer, counts, stats, sizes, checksums
  PREFIX.rejects.jsonl                         every rejected record: input, line, reason (a report, not data)
Each is a symlink into the version directory that .NAME.current points at (writer.py: how publishing is atomic);
a failed run leaves its rejects as a plain PREFIX.rejects.jsonl. PREFIX.lock exists while a run writes the prefix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT_VERSION = 1  # chats and text documents
PREFERENCE_FORMAT_VERSION = 2  # preference groups: v1's files plus the roles (and reference scores)
LOSS_MASK_SUFFIX = "_loss_mask"
DATA_SUFFIXES = (".bin", ".idx", f"{LOSS_MASK_SUFFIX}.bin", f"{LOSS_MASK_SUFFIX}.idx")
POSITION_OFFSETS_SUFFIX = "_position_offsets.npy"
ROLES_SUFFIX = "_roles.npy"
REFERENCE_LOGPS_SUFFIX = "_reference_logps.npy"
OPTIONAL_SUFFIXES = (POSITION_OFFSETS_SUFFIX, ROLES_SUFFIX, REFERENCE_LOGPS_SUFFIX)  # data files only some have
META_SUFFIX = ".json"
SCORES_SUFFIX = ".reference.npy"  # tools/score_reference.py's output, beside the dataset
SCORES_META_SUFFIX = ".reference.json"
REJECTS_SUFFIX = ".rejects.jsonl"
LOCK_SUFFIX = ".lock"


def data_files(prefix: str) -> list[Path]:
    return [Path(prefix + s) for s in DATA_SUFFIXES]


def optional_files(prefix: str) -> list[Path]:
    return [Path(prefix + s) for s in OPTIONAL_SUFFIXES]


def position_offsets_file(prefix: str) -> Path:
    return Path(prefix + POSITION_OFFSETS_SUFFIX)


def roles_file(prefix: str) -> Path:
    return Path(prefix + ROLES_SUFFIX)


def reference_logps_file(prefix: str) -> Path:
    return Path(prefix + REFERENCE_LOGPS_SUFFIX)


def scores_file(prefix: str) -> Path:
    return Path(prefix + SCORES_SUFFIX)


def scores_meta_file(prefix: str) -> Path:
    return Path(prefix + SCORES_META_SUFFIX)


def meta_file(prefix: str) -> Path:
    return Path(prefix + META_SUFFIX)


def rejects_file(prefix: str) -> Path:
    return Path(prefix + REJECTS_SUFFIX)


def lock_file(prefix: str) -> Path:
    return Path(prefix + LOCK_SUFFIX)


def all_files(prefix: str) -> list[Path]:
    return data_files(prefix) + [meta_file(prefix), rejects_file(prefix)]


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
