"""Read a packed dataset (format v1, or v2 for preference groups): pack k as tokens, loss mask, per-sample lengths
and, for documents whose pieces continue each other's positions, per-sample position offsets; for preference
groups each sample's role and, when the dataset has them, its reference score (a `PackSource`, see source.py):
from the records (PREFIX_reference_logps.npy), else from tools/score_reference.py (PREFIX.reference.npy, used only
when PREFIX.reference.json says it was computed for this dataset's checksums).

Opening validates the metadata version, the file sizes and (by default) the checksums, so that a truncated,
mismatched or half-written dataset is a clear error instead of a crash deep inside training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megalign.data import format as fmt
from megalign.data.groups import PROMPT, REJECTED, check_roles
from megalign.errors import MegalignError


@dataclass(frozen=True)
class Pack:
    tokens: np.ndarray  # [t] token ids of the pack's samples, concatenated
    loss_mask: np.ndarray  # [t] uint8
    lengths: np.ndarray  # [n] per-sample lengths, sum == t
    # [n] where each sample's position ids start (pieces of one document that continue its positions); None: 0
    position_offsets: np.ndarray | None = None
    # [n] preference datasets: each sample's role in its group (data/groups.py: PROMPT, CHOSEN, REJECTED + j); a group
    # is a prompt followed by its responses, never split across packs. None: not a preference dataset
    roles: np.ndarray | None = None
    # [n] float64, preference datasets with precomputed reference scores: each response's reference log-prob sum
    # (NaN for prompts). None: no scores
    reference_logps: np.ndarray | None = None


class PackedDataset:
    """A format-v1 or v2 dataset at `prefix`. `verify`: "full" (sizes and checksums), "sizes", or "none".
    `scores`: read tools/score_reference.py's PREFIX.reference.npy when the records carry no reference scores
    (False: ignore it, as the scoring pass itself does, so that a stale one can be replaced)."""

    def __init__(self, prefix: str, verify: str = "full", scores: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.meta = read_metadata(self.prefix)
        _verify_files(self.prefix, self.meta, verify)
        self._tokens = IndexedDataset(self.prefix)
        self._mask = IndexedDataset(self.prefix + fmt.LOSS_MASK_SUFFIX)
        self._offsets = None
        if self.meta.get("documents", {}).get("positions") == "continue":
            self._offsets = _read_array(self.prefix, fmt.position_offsets_file(self.prefix),
                                        "where each piece of a document starts its positions")
        self._roles = self._reference = None
        if self.meta["format_version"] == fmt.PREFERENCE_FORMAT_VERSION:
            self._roles = _read_array(self.prefix, fmt.roles_file(self.prefix), "each sequence's role in its preference group")
            if self.meta["preference"].get("reference_logps"):
                self._reference = _read_array(self.prefix, fmt.reference_logps_file(self.prefix),
                                              "each response's reference score")
            elif scores and any(f.exists() for f in (fmt.scores_file(self.prefix), fmt.scores_meta_file(self.prefix))):
                # no scores in the records: those of tools/score_reference.py, if made for this very dataset
                self._reference = read_scores(self.prefix, self.fingerprint()["sha256"])
        self._check_structure()
        if self._roles is not None:
            self._check_roles()

    def _check_structure(self) -> None:
        meta, tokens, mask = self.meta, self._tokens, self._mask
        problems = []
        if len(tokens) != meta["num_samples"]:
            problems.append(f"{len(tokens)} sequences in .idx, metadata says {meta['num_samples']} samples")
        if len(tokens.document_indices) - 1 != meta["num_packs"]:
            problems.append(f"{len(tokens.document_indices) - 1} documents in .idx, metadata says {meta['num_packs']} packs")
        if not np.array_equal(tokens.sequence_lengths, mask.sequence_lengths) or not np.array_equal(
            tokens.document_indices, mask.document_indices
        ):
            problems.append("token and loss-mask indexes differ")
        if self._offsets is not None and len(self._offsets) != len(tokens):
            problems.append(f"{len(self._offsets)} position offsets for {len(tokens)} sequences")
        for name, values in (("roles", self._roles), ("reference scores", self._reference)):
            if values is not None and len(values) != len(tokens):
                problems.append(f"{len(values)} {name} for {len(tokens)} sequences")
        if problems:
            raise MegalignError(f"dataset {self.prefix} is inconsistent: {'; '.join(problems)}")

    def _check_roles(self) -> None:
        """Every pack holds whole groups in role order (checked for all packs at once; the first bad one named)."""
        roles = np.asarray(self._roles, dtype=np.int64)
        bounds = np.asarray(self.pack_boundaries, dtype=np.int64)
        if not len(roles):
            return
        previous = np.concatenate([[-1], roles[:-1]])
        previous[bounds[:-1]] = -1  # nothing before a pack's first sample
        ok = np.where(roles == PROMPT, (previous == -1) | (previous >= REJECTED), (previous != -1) & (roles == previous + 1))
        bad_packs = np.flatnonzero(roles[bounds[1:] - 1] < REJECTED)  # a pack ends with a whole group
        if not ok.all():
            bad_packs = np.append(bad_packs, np.searchsorted(bounds, np.argmin(ok), side="right") - 1)
        if not len(bad_packs):
            return
        bad = int(bad_packs.min())
        first, end = int(bounds[bad]), int(bounds[bad + 1])
        try:
            check_roles(roles[first:end])
            problem = "its groups are not whole"
        except ValueError as e:
            problem = str(e)
        raise MegalignError(f"dataset {self.prefix} pack {bad}: {problem} ({fmt.roles_file(self.prefix)} is damaged "
                            "or from another run; re-run preprocessing)")

    def __len__(self) -> int:
        return self.meta["num_packs"]

    @property
    def seq_length(self) -> int:
        return self.meta["seq_length"]

    @property
    def sample_lengths(self) -> np.ndarray:
        return self._tokens.sequence_lengths

    @property
    def pack_boundaries(self) -> np.ndarray:
        """Sample index where each pack starts, plus the total: pack k is samples [b[k], b[k+1])."""
        return self._tokens.document_indices

    def pack_lengths(self) -> np.ndarray:
        cumulative = np.concatenate([[0], np.cumsum(self.sample_lengths, dtype=np.int64)])
        return np.diff(cumulative[self.pack_boundaries])

    def pack_sample_lengths(self, k: int) -> np.ndarray:
        first, last = int(self.pack_boundaries[k]), int(self.pack_boundaries[k + 1])
        return np.asarray(self.sample_lengths[first:last])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def max_token_id(self) -> int | None:
        """The largest token id in the dataset, as recorded at preprocessing (None: made before it was)."""
        value = self.meta.get("max_token_id")
        return int(value) if isinstance(value, int) else None

    def fingerprint(self) -> dict:
        """The path and the sha256 of each file (computed once, at preprocessing): a checkpoint's record of it."""
        return {"path": self.prefix, "sha256": {s: f["sha256"] for s, f in sorted(self.meta["files"].items())}}

    def __getitem__(self, k: int) -> Pack:
        if not 0 <= k < len(self):
            raise IndexError(f"pack {k} out of range [0, {len(self)})")
        first, last = int(self.pack_boundaries[k]), int(self.pack_boundaries[k + 1])
        lengths = self.sample_lengths[first:last]
        tokens = np.concatenate(self._tokens[first:last])
        loss_mask = np.concatenate(self._mask[first:last])
        offsets = None if self._offsets is None else np.asarray(self._offsets[first:last], dtype=np.int64)
        roles = None if self._roles is None else np.asarray(self._roles[first:last], dtype=np.int64)
        reference = None if self._reference is None else np.asarray(self._reference[first:last], dtype=np.float64)
        return Pack(tokens, loss_mask, np.asarray(lengths), offsets, roles, reference)


def _read_array(prefix: str, path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise MegalignError(f"{path} is missing: the metadata says the dataset has it ({what}); the dataset at "
                            f"{prefix} is incomplete: re-run preprocessing")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as e:
        raise MegalignError(f"{path} is not a numpy array file ({e}); re-run preprocessing") from None


def read_scores(prefix: str, sha256: dict) -> np.ndarray:
    """PREFIX.reference.npy (training/reference.py writes it), after checking that PREFIX.reference.json records
    the dataset checksums `sha256` (the dataset's PREFIX.json) and the checksum of the .npy itself."""
    scores, meta_path = fmt.scores_file(prefix), fmt.scores_meta_file(prefix)
    rerun = f"rerun tools/score_reference.py with data.path={prefix}"
    if not scores.is_file() or not meta_path.is_file():
        present, missing = (scores, meta_path) if scores.is_file() else (meta_path, scores)
        raise MegalignError(f"{present} exists without {missing} (an unfinished or damaged scoring run): {rerun}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        recorded, npy_sha = meta["dataset"]["sha256"], meta["scores"]["sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise MegalignError(f"{meta_path} is not a reference-scores record ({type(e).__name__}: {e}): "
                            f"{rerun}") from None
    if recorded != sha256:
        raise MegalignError(f"{scores} is stale: {meta_path} records other dataset checksums than "
                            f"{fmt.meta_file(prefix)} (the dataset changed since it was scored): {rerun}")
    if fmt.sha256_file(scores) != npy_sha:
        raise MegalignError(f"{scores} fails the sha256 that {meta_path} records (damaged, or from another scoring "
                            f"run): {rerun}")
    try:
        values = np.load(scores)
    except ValueError as e:
        raise MegalignError(f"{scores} is not a numpy array file ({e}): {rerun}") from None
    if values.dtype != np.float64 or values.ndim != 1:
        raise MegalignError(f"{scores} holds {values.dtype} of shape {values.shape}, not float64 per sequence: {rerun}")
    return values


def read_metadata(prefix: str) -> dict:
    path = fmt.meta_file(prefix)
    if not path.is_file():
        raise MegalignError(
            f"{path} not found: {prefix} is not a megalign packed dataset, or its preprocessing did not finish"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegalignError(f"{path} is not valid JSON ({e}); re-run preprocessing") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    kind = meta.get("record_kind") if isinstance(meta, dict) else None
    expected = fmt.PREFERENCE_FORMAT_VERSION if kind == "preference" else fmt.FORMAT_VERSION
    if version != expected:
        raise MegalignError(
            f"{path} has format_version {version!r}; this megalign reads version {expected} for "
            f"{kind or 'chat/text'} datasets (1: chats and text documents, 2: preference groups). "
            "Re-run tools/preprocess_data.py with this version"
        )
    if kind == "preference" and not isinstance(meta.get("preference"), dict):
        raise MegalignError(f"{path}: a preference dataset without its 'preference' section; the metadata is "
                            "damaged: re-run preprocessing")
    problem = _metadata_problem(meta)
    if problem:
        raise MegalignError(f"{path}: {problem}; the metadata is damaged: re-run preprocessing")
    return meta


def _metadata_problem(meta: dict) -> str | None:
    """What is wrong with the shape of a dataset's metadata (the keys readers use), or None."""
    for key, kind in (("num_samples", int), ("num_packs", int), ("seq_length", int), ("tokenizer", dict),
                      ("files", dict)):
        if not isinstance(meta.get(key), kind):
            return f"key {key!r} is missing or not a {kind.__name__}"
    tokenizer = meta["tokenizer"]
    if not isinstance(tokenizer.get("vocab_size"), int) or not isinstance(tokenizer.get("sha256"), str):
        return "key 'tokenizer' lacks an int 'vocab_size' or a str 'sha256'"
    for name, entry in meta["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            return f"files[{name!r}] lacks an int 'bytes' or a str 'sha256'"
    return None


def _verify_files(prefix: str, meta: dict, verify: str) -> None:
    if verify not in ("full", "sizes", "none"):
        raise ValueError(f"verify must be 'full', 'sizes' or 'none', got {verify!r}")
    if verify == "none":
        return
    for suffix, expected in meta["files"].items():
        path = Path(prefix + suffix)
        if not path.is_file():
            raise MegalignError(f"{path} is missing (the dataset at {prefix} is incomplete)")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise MegalignError(
                f"{path} has {size} bytes, metadata says {expected['bytes']}: truncated or from another run"
            )
        if verify == "full" and fmt.sha256_file(path) != expected["sha256"]:
            raise MegalignError(f"{path} fails its sha256 check: corrupted or from another run")
