"""Output: streamed sharded safetensors, index, tag-along files, model card, atomic commit.

The shard plan is computed from shapes and dtypes before any tensor is merged (as
huggingface_hub does), so each shard's safetensors header can be written first and every merged
tensor appended as soon as it exists: nothing is buffered, and peak memory does not depend on
``--shard-size`` (mergekit holds up to a whole 5 GB shard in RAM). Everything is written into a
temporary directory next to the target and renamed into place at the end, so a crash or Ctrl-C
never leaves a half-written output.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import OutputError
from .tensors import SAFETENSORS_CODES, TensorInfo

DEFAULT_SHARD_SIZE = 5_000_000_000
MAX_SHARD_SIZE = 10**15
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float) -> int:
    """'5GB' -> 5e9 bytes (decimal, as HF), '512MiB' -> binary, plain numbers are bytes; at
    least one byte and at most MAX_SHARD_SIZE (a finite number: '1e400' or 'nan' is refused)."""
    if isinstance(text, bool):
        raise OutputError(f"shard size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).upper() not in _UNITS:
            raise OutputError(f"shard size '{text[:40]}' is not a size; use e.g. 5GB, 500MB or "
                              "2GiB")
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value > MAX_SHARD_SIZE:
        raise OutputError(f"shard size {str(text)[:40]!r} is too large (at most 1PB)")
    if value < 1:
        raise OutputError(f"shard size must be at least 1 byte, got {str(text)[:40]!r}")
    return int(value)


def plan_shards(tensors: Sequence[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Greedy, order-preserving split; a tensor larger than ``max_bytes`` gets its own shard."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class StreamingSafetensorsFile:
    """A safetensors file whose header is written first; tensors must then arrive in order."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: dict[str, str]):
        self.path = path
        self._order = list(tensors)
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for t in tensors:
            if t.code not in SAFETENSORS_CODES:
                raise ValueError(f"{path}: tensor '{t.name}' has dtype {t.code}, which safetensors "
                                 "cannot store")
            header[t.name] = {"dtype": t.code, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape \
                or tensor.dtype != expected.dtype:
            raise RuntimeError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} "
                               f"{tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


class ShardedWriter:
    """Writes a planned list of tensors into HF-named shards (+ index when more than one)."""

    def __init__(self, directory: Path, tensors: Sequence[TensorInfo], shard_size: int,
                 metadata: dict[str, str] | None = None):
        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(tensors, shard_size)
        self.names = shard_names(len(self.shards))
        self._file_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self._order = [t.name for shard in self.shards for t in shard]
        self._written = 0
        self._open: tuple[int, StreamingSafetensorsFile] | None = None
        self.total_size = sum(t.nbytes for t in tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        # plan order only: going back to an earlier shard would truncate it
        expected = self._order[self._written] if self._written < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        index = self._file_of[name]
        if self._open is None or self._open[0] != index:
            if self._open is not None:
                self._open[1].close()
            path = self.directory / self.names[index]
            self._open = (index, StreamingSafetensorsFile(path, self.shards[index], self.metadata))
        self._open[1].write(name, tensor)
        self._written += 1

    def finalize(self) -> list[str]:
        if self._open is not None:
            self._open[1].close()
        if self._written != len(self._order):
            raise RuntimeError(f"writer finalized after {self._written} of {len(self._order)} "
                               "tensors")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size,
                             "mergewise_version": self.metadata.get("mergewise_version", "")},
                "weight_map": {t.name: self.names[i] for i, shard in enumerate(self.shards)
                               for t in shard},
            }
            (self.directory / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")
        return list(self.names)


def make_ordinary(path: Path | str, mode: int) -> None:
    """Give a file or directory made by ``mkstemp``/``mkdtemp`` (0600/0700) the permissions an
    ordinary ``open``/``mkdir`` would have: ``mode`` less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp file path next to ``path``; on success it replaces ``path`` (one rename),
    on any error it is deleted: readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_ordinary(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_tagalong(source_dir: Path | None, dest: Path, names: Sequence[str]) -> list[str]:
    """Copy config/tokenizer/generation files that exist in ``source_dir``; returns their names."""
    copied = []
    if source_dir is None:
        return copied
    for name in names:
        src = source_dir / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


class BackgroundWriter:
    """Hands tensors to ``write`` on a thread of its own, so writing one tensor overlaps merging
    the next (file writes and torch kernels release the GIL). At most ``depth`` tensors wait;
    the order is kept; an error in the thread is raised by the next ``write`` or by ``close``.
    The caller must not modify a tensor after handing it over."""

    def __init__(self, write: Callable[[str, torch.Tensor], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="mergewise-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None and not self._abort:
                try:
                    self._write(*item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((name, tensor))

    def close(self, abort: bool = False) -> None:
        """Wait until every tensor is written (or, with ``abort``, drop what is left), then
        re-raise a write error."""
        self._abort = self._abort or abort
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and not abort:
            raise self._error
