"""Lazy, read-only access to checkpoints, one tensor at a time.

Formats: a Hugging Face directory (``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors``
with ``model.safetensors.index.json``, or ``pytorch_model.bin[.index.json]``), a single
``.safetensors`` file, or a PyTorch ``.bin/.pt/.pth`` state dict (loaded with
``weights_only=True``: a pickle that needs code is refused, never executed).

Safetensors files are read with our own small header parser and plain ``readinto`` calls rather
than ``safe_open``: ``safe_open`` memory-maps the file, and every page it touches stays in the
process's resident set while the map is open, so a streaming merge of five 1 GB checkpoints would
report 5 GB of RSS. Positional reads keep the resident set at the tensors actually in use. The
parser checks every offset against the file size, so a truncated file fails at open time with a
message naming the file and tensor. Tests cross-check it against the ``safetensors`` library.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError, first_line
from .tensors import SAFETENSORS_DTYPES, TensorInfo

MAX_HEADER_BYTES = 100 * 1024 * 1024


class Checkpoint:
    """A read-only set of named tensors; ``read`` loads one tensor on demand."""

    label: str
    directory: Path | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def identity(self, name: str) -> str | None:
        """A string that changes whenever the tensor's stored bytes may have changed (for caches
        of per-tensor statistics), or None when there is none (in-memory tensors)."""
        return None

    def close(self) -> None:
        """Release file handles (safe to call twice)."""

    @property
    def config(self) -> dict | None:
        """The HF ``config.json`` next to the weights, if there is one."""
        if self.directory is None:
            return None
        path = self.directory / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: config.json is not valid JSON ({exc})") from None

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated at open, tensors read by offset."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(
                        f"{path}: truncated or not a safetensors file ({size} bytes, "
                        "shorter than the 8-byte header length); re-download or re-save it"
                    )
                (header_len,) = struct.unpack("<Q", head)
                if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                    raise CheckpointError(
                        f"{path}: corrupt or truncated safetensors file (header claims "
                        f"{header_len} bytes, file has {size}); re-download or re-save it"
                    )
                raw = fh.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: corrupt safetensors header ({exc}); re-download or re-save it"
            ) from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, size)

    def _check_entry(self, name: str, entry: object, size: int) -> tuple[TensorInfo, int, int]:
        try:
            code = entry["dtype"]  # type: ignore[index]
            shape = tuple(int(s) for s in entry["shape"])  # type: ignore[index]
            begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has a malformed header entry; re-save the file"
            ) from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has dtype {code}, which mergewise cannot read "
                "(quantized? dequantize to float16/bfloat16/float32 first)"
            )
        info = TensorInfo(name, shape, SAFETENSORS_DTYPES[code], str(self.path))
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' header says {end - begin} bytes but shape "
                f"{list(shape)} of {code} needs {info.nbytes}; the file is corrupt"
            )
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor '{name}' ends at byte "
                f"{self._data_start + end} but the file has {size} bytes; re-download it"
            )
        return info, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, by a positional read into a fresh buffer: no shared file offset, so
        reads from several threads (the engine's prefetch) do not disturb each other."""
        info, begin, end = self._entries[name]
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open; raw reads
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < end - begin:  # preadv may return less than asked for on huge reads
            n = os.preadv(self._fh.fileno(), [view[got:]], self._data_start + begin + got)
            if n <= 0:
                raise CheckpointError(
                    f"{self.path}: short read of tensor '{name}' ({got} of {end - begin} bytes); "
                    "the file changed or is truncated"
                )
            got += n
        return buf.view(info.dtype).reshape(info.shape)

    def identity(self, name: str) -> str:
        """The file (real path, size, inode, mtime), the tensor's header entry and a hash of 48
        KiB sampled from its start, middle and end: any rewrite of the file changes the mtime,
        any other tensor content the sampled bytes very likely."""
        info, begin, end = self._entries[name]
        st = self.path.stat()
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.path.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{name}|"
                 f"{info.dtype}|{list(info.shape)}|{begin}|{end}".encode())
        span = end - begin
        with open(self.path, "rb", buffering=0) as fh:
            for start in sorted({0, max(0, span // 2 - 8192), max(0, span - 16384)}):
                h.update(os.pread(fh.fileno(), min(16384, span - start),
                                  self._data_start + begin + start))
        return h.hexdigest()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files seen as one checkpoint (sharded HF layout included)."""

    def __init__(self, label: str, files: list[Path], directory: Path | None,
                 weight_map: Mapping[str, str] | None = None):
        self.label = label
        self.directory = directory
        self._files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for name in f.names():
                if name in self._where:
                    raise CheckpointError(
                        f"{label}: tensor '{name}' appears in both {self._where[name].path.name} "
                        f"and {f.path.name}; the shards are inconsistent"
                    )
                self._where[name] = f
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise CheckpointError(
                    f"{label}: the index lists {len(missing)} tensor(s) absent from the shards "
                    f"(first: '{missing[0]}'); the download is incomplete"
                )

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def identity(self, name: str) -> str:
        return self._where[name].identity(name)

    def close(self) -> None:
        for f in self._files:
            f.close()


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict (for the Python API, and for torch ``.bin`` files)."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor],
                 directory: Path | None = None):
        self.label = label
        self.directory = directory
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"{label}: entry '{bad[0]}' is a {type(tensors[bad[0]]).__name__}, not a tensor"
            )
        self._tensors = dict(tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, self.label)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict safely (``weights_only=True``, memory-mapped when possible)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is many lines of advice with ANSI codes; keep the one line that matters
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        lines = [ln.strip() for ln in text.split("WeightsUnpickler error:")[-1].splitlines()]
        detail = next((ln for ln in lines if ln), "unsupported content")
        if not re.search(r"global|reduce|class|build", detail, re.IGNORECASE):
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (corrupt or not a pickle: "
                f"{detail[:160]}); re-download or re-save it"
            ) from None
        found = re.search(r"GLOBAL (\S+)", detail)
        what = f"it references {found.group(1)}" if found else detail[:160]
        raise CheckpointError(
            f"{path}: refused to load: this pickle needs code to run ({what}); "
            "mergewise loads only plain tensors (weights_only=True) and never executes a "
            "checkpoint; convert it to safetensors in a trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({first_line(exc)})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; is it a training state file?")
    return tensors


def _from_index(index_path: Path, label: str) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ValueError("'weight_map' must map tensor names to shard file names")
    except KeyError as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index (no {exc} key); "
                              "re-download it") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({exc}); "
                              "re-download it") from None
    directory = index_path.parent
    shard_names = list(dict.fromkeys(weight_map.values()))
    outside = [s for s in shard_names if not isinstance(s, str) or Path(s).name != s]
    if outside:
        raise CheckpointError(f"{index_path}: shard name {outside[0]!r} is not a plain file name in "
                              "the checkpoint directory; refusing to read outside it")
    missing = [s for s in shard_names if not (directory / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: shard file {missing[0]} is missing ({len(missing)} of "
            f"{len(shard_names)} missing); the download is incomplete"
        )
    if index_path.name.endswith(".safetensors.index.json"):
        return SafetensorsCheckpoint(label, [directory / s for s in shard_names], directory,
                                     weight_map)
    tensors: dict[str, torch.Tensor] = {}
    for s in shard_names:
        tensors.update(_load_torch_file(directory / s))
    return StateDictCheckpoint(label, tensors, directory)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint by path, detecting its format; nothing but headers is read yet."""
    p = Path(path).expanduser()
    label = str(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory; check the path in the recipe")
    if p.is_dir():
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / name).is_file():
                return _from_index(p / name, label)
        if (p / "model.safetensors").is_file():
            return SafetensorsCheckpoint(label, [p / "model.safetensors"], p)
        for name in ("pytorch_model.bin", "model.pt", "model.pth"):
            if (p / name).is_file():
                return StateDictCheckpoint(label, _load_torch_file(p / name), p)
        singles = sorted(p.glob("*.safetensors"))
        if len(singles) == 1:
            return SafetensorsCheckpoint(label, singles, p)
        hint = (f"it has {len(singles)} .safetensors files but no model.safetensors.index.json"
                if singles else "no model.safetensors, sharded index or pytorch_model.bin")
        raise CheckpointError(f"{p}: not a checkpoint directory ({hint})")
    if p.suffix == ".safetensors":
        return SafetensorsCheckpoint(label, [p], None)
    if p.name.endswith(".index.json"):
        return _from_index(p, label)
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return StateDictCheckpoint(label, _load_torch_file(p), None)
    raise CheckpointError(
        f"{p}: not a checkpoint (expected a directory, .safetensors, .bin, .pt or .pth)"
    )

