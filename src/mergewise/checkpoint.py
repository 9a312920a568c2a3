"""Lazy, read-only access to checkpoints, one tensor at a time.

Formats: a Hugging Face directory (``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors``
with ``model.safetensors.index.json``, or ``pytorch_model.bin[.index.json]``), a single
``.safetensors`` file, or a PyTorch ``.bin/.pt/.pth`` state dict (loaded with
``weights_only=True``: a pickle that needs code is refused, never executed).

Safetensors files are read with our own small header parser and plain ``readinto`` calls rather
than ``safe_open``: ``safe_open`` memory-maps the file, and every page it touches stays in the
process's resident set while the map is open, so a streaming merge of five 1 GB checkpoints would
report 5 GB of RSS. Positional reads keep the resident set at the tensors actually in use. The
parser accepts exactly the files the library accepts (header JSON, field types, sizes, and byte
ranges that tile the data section), so a corrupt or truncated file fails at open time with one
line naming the file, the tensor and the fault; tests/hostile cross-checks it with the library.

A torch file that ``weights_only`` loading refuses is told apart, by a static disassembly of its
pickle (nothing runs), as one that needs code (it references globals outside torch's allowlist)
or one that is corrupt (the pickle is incomplete or not a pickle).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line, printable
from .tensors import SAFETENSORS_DTYPES, TensorInfo

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
_U64_LIMIT = 1 << 64  # the library's shapes and offsets are usize: 64-bit unsigned
_TORCH_DIM_LIMIT = (1 << 63) - 1  # torch sizes are int64
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
# serde_json's recursion limit lets the library read 127 levels of nesting: the header object and
# a tensor entry are two, so an extra field of an entry may nest 125 deep
_MAX_EXTRA_DEPTH = 125


def _q(name: str) -> str:
    """A name from a file, quoted for a one-line message."""
    return f"'{printable(name)}'"


def read_config(path: Path) -> dict[str, Any]:
    """A model's ``config.json``, read as transformers reads it (UTF-8 JSON, one object), with
    the fields mergewise acts on checked for type, so that a damaged config is one line naming
    the file and the field rather than a traceback or a silently wrong architecture check."""
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: config.json is not UTF-8 text (byte {exc.start}: "
                              f"{exc.reason}); fix or re-download it") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: config.json is not valid JSON ({first_line(exc, 120)}); "
                              "fix or re-download it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: config.json is a JSON {_json_type(cfg)}, not an object; "
                              "fix or re-download it")
    problem = _config_problem(cfg)
    if problem:
        raise CheckpointError(f"{path}: config.json {problem}; fix or re-download it")
    return cfg


def _config_problem(cfg: dict[str, Any]) -> str | None:
    """What is wrong with the config fields mergewise reads (None: nothing): a quantization
    config must be an object or null, the architectures a list of class names or null, the
    model type a string or null."""
    quant, arch, kind = (cfg.get(k) for k in ("quantization_config", "architectures", "model_type"))
    if quant is not None and not isinstance(quant, dict):
        return (f"has quantization_config {json.dumps(quant)[:40]} (a JSON {_json_type(quant)}), "
                "not an object or null")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        return (f"has architectures {json.dumps(arch)[:60]}, not a list of class names such as "
                '["LlamaForCausalLM"]')
    if kind is not None and not isinstance(kind, str):
        return f"has model_type {json.dumps(kind)[:40]}, not a string"
    return None


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

    def holds_delta(self, base: Checkpoint, name: str) -> bool:
        """Whether ``delta_over(base, name, ...)`` gives this tensor's task vector directly."""
        return False

    def delta_over(self, base: Checkpoint, name: str, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor | None:
        """The task vector over ``base`` when this checkpoint stores one (a LoRA adapter on that
        very base: ``scale * B @ A``, exact, with no round trip through full weights); None:
        it is ``read(name)`` minus the base's tensor."""
        return None

    def prefetches(self, name: str) -> bool:
        """Whether reading ``name`` ahead (on the prefetch thread) is worth it."""
        return True

    def close(self) -> None:
        """Release file handles (safe to call twice)."""

    @property
    def config(self) -> dict | None:
        """The HF ``config.json`` next to the weights, if there is one."""
        if self.directory is None:
            return None
        path = self.directory / "config.json"
        return read_config(path) if path.is_file() else None

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _JsonObject(dict):
    """A JSON object that remembers which keys it was given more than once: ``json`` keeps the
    last value, as the library does for tensor names and ``__metadata__`` keys, but the library
    refuses a repeated ``__metadata__`` or a repeated field of a tensor entry."""

    __slots__ = ("repeated",)
    repeated: frozenset[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    obj.repeated = frozenset()
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return obj


def _json_int(text: str) -> int | float:
    """An integer as serde_json reads it: ``-0`` is a float, beyond f64 range is an error."""
    if text == "-0":
        return -0.0
    if len(text) > 300 and math.isinf(float(text)):
        raise ValueError(f"number out of range ({text[:12]}... with {len(text)} digits)")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range ({text[:40]})")
    return value


def _json_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"),
                       ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null"


def _depth(value: object) -> int:
    """How deeply lists and objects nest in ``value`` (0 for a scalar), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level + 1)
            todo.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_safetensors_header(raw: bytes) -> Any:
    """The header's JSON, read as strictly as the ``safetensors`` library (Rust, serde_json)
    reads it, so that a file one accepts the other accepts: strict UTF-8, no BOM, no NaN or
    Infinity, no number beyond f64 range, no ``\\u`` escape of a lone surrogate. Raises
    ValueError (UnicodeDecodeError, JSONDecodeError) or RecursionError."""
    text = raw.decode("utf-8")
    header = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int,
                        parse_float=_json_float, parse_constant=_json_constant)
    if "\\u" in text:  # json decodes a lone surrogate escape to a lone surrogate: find one
        try:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a \\u escape encodes a lone surrogate, not a character") from None
    return header


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated at open, tensors read by offset.

    The header is checked exactly as strictly as the ``safetensors`` library checks it (its
    ``Metadata::validate``; see docs/reliability.md), so that a merge never reads bytes another
    tool would refuse, and every refusal is one line naming the file, the tensor and the fault.
    The tensors' byte ranges must tile the data section: sorted by offset, the first starts at
    0, each starts where the previous ends, the last ends at the end of the file."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        size, header_len, raw = self._read_header()
        try:
            header = parse_safetensors_header(raw)
        except (ValueError, RecursionError) as exc:
            what = ("not UTF-8" if isinstance(exc, UnicodeDecodeError)
                    else "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON")
            raise CheckpointError(f"{path}: corrupt safetensors header ({what}: {first_line(exc)}); "
                                  "re-download or re-save it") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {_json_type(header)}, "
                                  "not an object); re-download or re-save it")
        self._data_start = 8 + header_len
        twice = sorted(header.repeated.difference(["__metadata__"]))
        # the library, like json, keeps the last entry of a repeated name: say so when it matters
        self._twice = (f" (tensor {_q(twice[0])} is listed more than once; the last entry counts)"
                       if twice else "")
        self.metadata: dict[str, str] = self._metadata(header)
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {
            name: self._check_entry(name, entry) for name, entry in header.items()
            if name != "__metadata__"}
        self._check_layout(size - self._data_start)

    def _read_header(self) -> tuple[int, int, bytes]:
        """The file size, the header length field and the header bytes."""
        path = self.path
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
                if header_len > MAX_HEADER_BYTES:
                    raise CheckpointError(
                        f"{path}: corrupt safetensors file (the header length field says "
                        f"{header_len:,} bytes, over the format's limit of {MAX_HEADER_BYTES:,}); "
                        "re-download or re-save it")
                if 8 + header_len > size:
                    raise CheckpointError(
                        f"{path}: corrupt or truncated safetensors file (header claims "
                        f"{header_len} bytes, file has {size}); re-download or re-save it"
                    )
                raw = fh.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return size, header_len, raw

    def _metadata(self, header: _JsonObject) -> dict[str, str]:
        """``__metadata__``: absent, null, or one object of strings (the library's rule)."""
        meta = header.get("__metadata__")
        problem = ("appears twice" if "__metadata__" in header.repeated
                   else None if meta is None
                   else f"is a JSON {_json_type(meta)}, not an object" if not isinstance(meta, dict)
                   else next((f"gives {_q(k)} a JSON {_json_type(v)}, not a string"
                              for k, v in meta.items() if not isinstance(v, str)), None))
        if problem:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ {problem});"
                                  " re-download or re-save it")
        return dict(meta or {})

    def _bad(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {_q(name)} {problem}; the file is corrupt")

    def _malformed(self, name: str, why: str) -> CheckpointError:
        return self._bad(name, f"has a malformed header entry ({why})")

    def _entry_fields(self, name: str, entry: object) -> tuple[object, object, object]:
        """dtype, shape and data_offsets of an entry: an object with those three fields (others
        are ignored, as by the library, if they nest no deeper than it parses) or, as the
        library also reads it, a list of the three."""
        if isinstance(entry, list):
            if len(entry) != 3:
                raise self._malformed(name, f"a list of {len(entry)} items, not [dtype, shape, "
                                            "data_offsets]")
            return entry[0], entry[1], entry[2]
        if not isinstance(entry, _JsonObject):
            raise self._malformed(name, f"a JSON {_json_type(entry)}, not an object")
        twice = sorted(entry.repeated.intersection(_ENTRY_FIELDS))
        missing = [k for k in _ENTRY_FIELDS if k not in entry]
        if twice or missing:
            raise self._malformed(name, f"{_q(twice[0])} given twice" if twice
                                  else f"no {_q(missing[0])}")
        for key, value in entry.items():
            if key not in _ENTRY_FIELDS and _depth(value) > _MAX_EXTRA_DEPTH:
                raise self._malformed(name, f"{_q(key)} nests deeper than the safetensors library "
                                            "reads")
        return entry["dtype"], entry["shape"], entry["data_offsets"]

    def _dtype_code(self, name: str, value: object) -> str:
        """The dtype code: a string, or the one-key ``{"F32": null}`` form serde also reads."""
        if isinstance(value, dict) and len(value) == 1 and None in value.values():
            value = next(iter(value))
        if not isinstance(value, str):
            raise self._malformed(name, f"dtype is a JSON {_json_type(value)}, not a string")
        if value not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {_q(name)} has dtype {printable(value, 40)}, which mergewise cannot read "
                "(quantized? dequantize to float16/bfloat16/float32 first)"
            )
        return value

    def _uints(self, name: str, field: str, value: object) -> list[int]:
        """A list of unsigned 64-bit integers (the library's ``usize``), else a clear error."""
        if not isinstance(value, list):
            raise self._malformed(name, f"'{field}' is a JSON {_json_type(value)}, not a list")
        for v in value:
            if type(v) is not int:
                raise self._malformed(name, f"'{field}' {printable(str(value), 60)} holds a {_json_type(v)}, not an "
                                            "integer")
            if v < 0:
                raise self._bad(name, f"has a negative number in its {field} {printable(str(value), 60)}")
            if v >= _U64_LIMIT:
                raise self._bad(name, f"has {v} in its {field}, beyond 64 bits")
        return value  # type: ignore[return-value]

    def _check_size(self, name: str, code: str, shape: list[int]) -> TensorInfo:
        """The tensor's descriptor once its size is known to fit: the library multiplies the
        dimensions in order and refuses an overflow of 64 bits (of the bit count, too); torch
        refuses dimensions over 2^63 - 1 and a few zero-size shapes it cannot stride."""
        info = TensorInfo(name, tuple(shape), SAFETENSORS_DTYPES[code], str(self.path))
        numel = 1
        for d in shape:
            numel *= d
            if numel >= _U64_LIMIT:
                break
        if numel * info.dtype.itemsize * 8 >= _U64_LIMIT:
            raise self._bad(name, f"has shape {printable(str(shape), 80)}, whose size overflows 64 bits")
        if any(d > _TORCH_DIM_LIMIT for d in shape):
            raise self._bad(name, f"has shape {printable(str(shape), 80)}, with a dimension beyond torch's limit "
                                  f"of {_TORCH_DIM_LIMIT}")
        if numel == 0:
            try:
                torch.empty(0, dtype=torch.uint8).view(info.dtype).reshape(info.shape)
            except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
                raise self._bad(name, f"has shape {printable(str(shape), 80)}, which torch cannot hold "
                                      f"({first_line(exc, 80)})") from None
        return info

    def _check_entry(self, name: str, entry: object) -> tuple[TensorInfo, int, int]:
        dtype, shape_value, offsets_value = self._entry_fields(name, entry)
        code = self._dtype_code(name, dtype)
        shape = self._uints(name, "shape", shape_value)
        offsets = self._uints(name, "data_offsets", offsets_value)
        if len(offsets) != 2:
            raise self._malformed(name, f"data_offsets {printable(str(offsets), 80)} is not [begin, end]")
        begin, end = offsets
        info = self._check_size(name, code, shape)
        if end < begin:
            raise self._bad(name, f"has data_offsets {offsets}, which end before they begin")
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {_q(name)} header says {end - begin} bytes but shape "
                f"{printable(str(shape), 80)} of {code} needs {info.nbytes}; the file is corrupt"
            )
        return info, begin, end

    def _check_layout(self, data_len: int) -> None:
        """The tensors' byte ranges, in offset order, must tile the ``data_len`` data bytes
        exactly: no overlap (two tensors sharing bytes), no gap, nothing before the first or
        after the last, nothing missing at the end. O(n log n) in the number of tensors."""
        spans = sorted((begin, end, name) for name, (_, begin, end) in self._entries.items())
        at, prev = 0, None
        for begin, end, name in spans:
            if begin < at and prev is not None:
                raise CheckpointError(
                    f"{self.path}: tensors {_q(prev[2])} and {_q(name)} overlap in the file (data "
                    f"bytes {prev[0]}-{prev[1]} and {begin}-{end}); the file is corrupt{self._twice}")
            if begin > at:
                where = (f"between tensors {_q(prev[2])} and {_q(name)}" if prev is not None
                         else f"before the first tensor, {_q(name)},")
                raise CheckpointError(
                    f"{self.path}: data bytes {at}-{begin} {where} belong to no tensor; the file "
                    f"is corrupt{self._twice}")
            at, prev = end, (begin, end, name)
        if at > data_len:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {_q(prev[2])} ends at byte "  # type: ignore[index]
                f"{self._data_start + at} but the file has {self._data_start + data_len} bytes "
                f"(or its header is corrupt){self._twice}; re-download it")
        if at < data_len:
            after = f"after the last tensor, {_q(prev[2])}," if prev is not None else "after a header of no tensors"
            raise CheckpointError(
                f"{self.path}: {data_len - at} bytes at the end of the file {after} belong to no "
                f"tensor; the file is corrupt (or something was appended to it){self._twice}")

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
                    f"{self.path}: short read of tensor {_q(name)} ({got} of {end - begin} bytes); "
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
                        f"{label}: tensor {_q(name)} appears in both {self._where[name].path.name} "
                        f"and {f.path.name}; the shards are inconsistent"
                    )
                self._where[name] = f
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise CheckpointError(
                    f"{label}: the index lists {len(missing)} tensor(s) absent from the shards "
                    f"(first: {_q(missing[0])}); the download is incomplete"
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
                f"{label}: entry {_q(bad[0])} is a {type(tensors[bad[0]]).__name__}, not a tensor"
            )
        self._tensors = dict(tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, self.label)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_SCAN_LIMIT = 64 * 1024 * 1024  # the pickle part of any real torch file is far smaller
_LEGACY_PICKLES = 5  # a legacy torch.save file: magic, protocol, sys info, data, storage keys
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                         "BINSTRING", "SHORT_BINSTRING"})
_SILENT_OPS = frozenset({"FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "PROTO", "MARK"})


@dataclass
class _PickleScan:
    """What a static disassembly of a torch file's pickles found (``pickletools``: nothing is
    imported or run): the globals each complete pickle references, the highest protocol, and
    why the disassembly stopped early (truncated, not a pickle), if it did."""

    references: list[str]
    protocol: int
    error: str | None


def _global_name(module: str, name: str = "") -> str:
    """``module.name`` as torch's loader looks it up (Python 2 names mapped as pickle maps them)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _references(stream: io.BytesIO, refs: list[str]) -> int:
    """Disassemble one pickle from ``stream``, adding the globals it references to ``refs``
    (GLOBAL and INST name them; STACK_GLOBAL takes the two strings pushed before it, possibly
    through the memo); returns its protocol. Raises ValueError where the pickle is malformed."""
    protocol, memo, pushed = 0, {}, []  # pushed: the values pushed so far (strings, else None)
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            refs.append(_global_name(*str(arg).split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            names = pushed[-2:]
            refs.append(_global_name(*names) if len(names) == 2 and all(isinstance(n, str) for n in names)
                        else "a global it names at run time")
        elif op.name == "PROTO":
            protocol = int(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        if op.name in _STRING_OPS:
            pushed.append(arg)
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name not in _SILENT_OPS:
            pushed.append(None)
    return protocol


def _pickle_bytes(path: Path) -> bytes | str:
    """The pickle torch unpickles first: a zip checkpoint's ``data.pkl``, else the start of the
    file (a legacy ``torch.save`` file or a bare pickle); a string says why there is none."""
    with open(path, "rb") as fh:
        head = fh.read(_PICKLE_SCAN_LIMIT)
    if not head.startswith(_ZIP_MAGIC):
        return head
    try:
        with zipfile.ZipFile(path) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            if member is None:
                return "a zip archive without data.pkl"
            with zf.open(member) as fh:
                return fh.read(_PICKLE_SCAN_LIMIT)
    except Exception as exc:  # zipfile raises many types on a damaged archive
        return f"a truncated or damaged zip archive ({first_line(exc, 100)})"


def _scan_torch_file(path: Path) -> _PickleScan:
    """Disassemble the pickles torch would run (never executing them) to tell a checkpoint that
    needs code from one that is corrupt, independently of torch's wording."""
    data = _pickle_bytes(path)
    if isinstance(data, str):
        return _PickleScan([], 0, data)
    if not data:
        return _PickleScan([], 0, "the file is empty")
    stream, refs, protocol = io.BytesIO(data), [], 0
    for _ in range(_LEGACY_PICKLES):
        start, found = stream.tell(), []
        if start == len(data):
            break
        try:
            protocol = max(protocol, _references(stream, found))
        except Exception as exc:  # pickletools raises ValueError, and others on odd input
            return _PickleScan(refs, protocol, f"at byte {start}: {first_line(exc, 100)}")
        refs += found
    return _PickleScan(refs, protocol, None)


def _safe_globals() -> set[str]:
    """The globals torch's ``weights_only`` loader allows (its own table, which torch versions
    extend), else the few a plain state dict needs."""
    try:
        from torch import _weights_only_unpickler as wo
        return set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except (ImportError, AttributeError):
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.Size",
                "torch._utils._rebuild_parameter", "torch.nn.parameter.Parameter"}


def _torch_refusal(path: Path, exc: Exception) -> CheckpointError:
    """The one-line reason torch could not load ``path``, judged by the file's structure (what
    its pickles reference, whether they are complete), not by torch's changing messages."""
    scan = _scan_torch_file(path)
    unsafe = list(dict.fromkeys(r for r in scan.references if r not in _safe_globals()))
    if unsafe:
        shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        return CheckpointError(
            f"{path}: refused to load: this pickle needs code to run (it references {shown}); "
            "mergewise loads only plain tensors (weights_only=True) and never executes a "
            "checkpoint; convert it to safetensors in a trusted environment")
    if scan.error is not None:
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or not a "
                               f"pickle: {scan.error}); re-download or re-save it")
    if scan.protocol > 2:
        return CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (pickle protocol {scan.protocol}, which "
            "torch's weights_only loader does not read); re-save it with torch.save's default "
            "protocol, or as safetensors")
    inner = exc.__context__ if isinstance(exc, pickle.UnpicklingError) and exc.__context__ else exc
    reason = first_line(Exception(re.sub(r"\x1b\[[0-9;]*m", "", str(inner))), 160)
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint (torch: {reason}); "
                           "re-download or re-save it")


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict safely (``weights_only=True``; memory-mapped when it is a zip
    checkpoint, the format ``mmap`` needs). Torch's warnings (an unusual pickle protocol...) are
    silenced: a refusal is reported once, as one line."""
    try:
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == _ZIP_MAGIC
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # torch lets KeyError, IndexError, struct.error... out of bad files
        raise _torch_refusal(path, exc) from None
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
        if (p / "adapter_config.json").is_file():
            raise CheckpointError(f"{p}: is a PEFT adapter (adapter_config.json), not a full "
                                  "checkpoint; adapters are models: entries of a recipe with a "
                                  "base_model (or 'base+adapter')")
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

