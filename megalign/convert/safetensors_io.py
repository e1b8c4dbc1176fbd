"""Reading and writing Hugging Face safetensors checkpoints, one file (or one shard) at a time.

Reading: `model.safetensors`, or the shards that `model.safetensors.index.json` lists. Files are opened one at a
time and closed before the next, so memory holds the tensors being copied and never a second copy of the model.
Writing: tensors are buffered up to the shard size, each shard written under a temporary name; at the end the
shards get HF's names (`model-00001-of-00003.safetensors`, or `model.safetensors` when one suffices) and the index
is written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from megalign.errors import MegalignError, OptionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError:
        raise MegalignError("the safetensors package is needed for HF conversion: pip install safetensors") from None
    return safe_open, save_file


class SafetensorsReader:
    """The tensors of a HF model directory, by name; iterated file by file."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index, single = self.directory / INDEX, self.directory / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise MegalignError(f"{index}: not a safetensors index ({e})") from None
            self.files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                self.files.setdefault(file, []).append(name)
            for file in self.files:
                if not (self.directory / file).is_file():
                    raise MegalignError(f"{index} lists {file}, which is missing")
        elif single.is_file():
            self.files = {SINGLE: None}  # names read from the file
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            other = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            if found:
                self.files = {f: None for f in found}
            elif other:
                raise MegalignError(f"{self.directory} holds {other[0]} but no safetensors: only safetensors are "
                                    "read (transformers' save_pretrained writes them)")
            else:
                raise MegalignError(f"{self.directory}: no {SINGLE} or {INDEX}")
        safe_open, _ = _safetensors()
        self._safe_open = safe_open

    def metadata(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype) for every tensor, read from the headers only."""
        found = {}
        for file in self.files:
            for name, info in read_header(self.directory / file).items():
                if name in found:
                    raise MegalignError(f"{self.directory}: tensor {name} is stored twice")
                found[name] = (tuple(info["shape"]), info["dtype"])
        return found

    def iter_files(self) -> Iterator[tuple[str, Iterator[tuple[str, torch.Tensor]]]]:
        for file in self.files:
            yield file, self._tensors(file)

    def _tensors(self, file: str):
        with self._safe_open(str(self.directory / file), framework="pt", device="cpu") as f:
            names = self.files[file] if self.files[file] is not None else list(f.keys())
            for name in names:
                yield name, f.get_tensor(name)


def read_header(path: Path) -> dict:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}), without reading tensor data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MegalignError(f"{path}: not a safetensors file (truncated header)")
        size = int.from_bytes(raw, "little")
        if size > 100 * 2**20:
            raise MegalignError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MegalignError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' (10^9, as transformers counts), '2GiB', '500MB' or a number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or (match.group(2) or "").upper() not in _UNITS:
        raise OptionError("max_shard_size", f"{text!r}: expected a size like 5GB, 500MB, 2GiB or bytes")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


class ShardedWriter:
    """Writes tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""

    def __init__(self, directory: str | Path, max_shard_bytes: int):
        _, self._save_file = _safetensors()
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self.buffer:
            return
        tmp = f".shard-{len(self.shards) + 1:05d}.safetensors.tmp"
        self._save_file(self.buffer, str(self.directory / tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Give the shards their final names, write the index (when sharded); the files written."""
        self._flush()
        if len(self.shards) == 1:
            os.replace(self.directory / self.shards[0][0], self.directory / SINGLE)
            return [SINGLE]
        n = len(self.shards)
        weight_map, written = {}, []
        for i, (tmp, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            weight_map.update({name: final for name in names})
            written.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return written + [INDEX]
