"""One safetensors file read without memory-mapping it: our own header parser and positional reads.

``safe_open`` memory-maps the file, and every page it touches stays in the process's resident set
while the map is open, so a streaming merge of five 1 GB checkpoints would report 5 GB of RSS.
Positional reads keep the resident set at the tensors actually in use. The parser accepts
exactly the files the library accepts (header JSON, field types, sizes, and byte ranges that
tile the data section), so a corrupt or truncated file fails at open time with one line naming
the file, the tensor and the fault; tests/hostile cross-checks it with the library.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line, printable, quoted
from .tensors import SAFETENSORS_CODES, TensorInfo

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
_U64_LIMIT = 1 << 64  # the library's shapes and offsets are usize: 64-bit unsigned
_TORCH_DIM_LIMIT = (1 << 63) - 1  # torch sizes are int64
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
# serde_json's recursion limit lets the library read 127 levels of nesting: the header object and
# a tensor entry are two, so an extra field of an entry may nest 125 deep
_MAX_EXTRA_DEPTH = 125


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


def json_type(value: object) -> str:
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
        self._opening = threading.Lock()
        size, header_len, raw = self._read_header()
        try:
            header = parse_safetensors_header(raw)
        except (ValueError, RecursionError) as exc:
            what = ("not UTF-8" if isinstance(exc, UnicodeDecodeError)
                    else "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON")
            raise CheckpointError(f"{path}: corrupt safetensors header ({what}: {first_line(exc)}); "
                                  "re-download or re-save it") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {json_type(header)}, "
                                  "not an object); re-download or re-save it")
        self._data_start = 8 + header_len
        twice = sorted(header.repeated.difference(["__metadata__"]))
        # the library, like json, keeps the last entry of a repeated name: say so when it matters
        self._twice = (f" (tensor {quoted(twice[0])} is listed more than once; the last entry counts)"
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
                   else f"is a JSON {json_type(meta)}, not an object" if not isinstance(meta, dict)
                   else next((f"gives {quoted(k)} a JSON {json_type(v)}, not a string"
                              for k, v in meta.items() if not isinstance(v, str)), None))
        if problem:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ {problem});"
                                  " re-download or re-save it")
        return dict(meta or {})

    def _bad(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {quoted(name)} {problem}; the file is corrupt")

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
            raise self._malformed(name, f"a JSON {json_type(entry)}, not an object")
        twice = sorted(entry.repeated.intersection(_ENTRY_FIELDS))
        missing = [k for k in _ENTRY_FIELDS if k not in entry]
        if twice or missing:
            raise self._malformed(name, f"{quoted(twice[0])} given twice" if twice
                                  else f"no {quoted(missing[0])}")
        for key, value in entry.items():
            if key not in _ENTRY_FIELDS and _depth(value) > _MAX_EXTRA_DEPTH:
                raise self._malformed(name, f"{quoted(key)} nests deeper than the safetensors library "
                                            "reads")
        return entry["dtype"], entry["shape"], entry["data_offsets"]

    def _dtype_code(self, name: str, value: object) -> str:
        """The dtype code: a string, or the one-key ``{"F32": null}`` form serde also reads."""
        if isinstance(value, dict) and len(value) == 1 and None in value.values():
            value = next(iter(value))
        if not isinstance(value, str):
            raise self._malformed(name, f"dtype is a JSON {json_type(value)}, not a string")
        if value not in SAFETENSORS_CODES:
            raise CheckpointError(
                f"{self.path}: tensor {quoted(name)} has dtype {printable(value, 40)}, which mergewise cannot read "
                "(quantized? dequantize to float16/bfloat16/float32 first)"
            )
        return value

    def _uints(self, name: str, field: str, value: object) -> list[int]:
        """A list of unsigned 64-bit integers (the library's ``usize``), else a clear error."""
        if not isinstance(value, list):
            raise self._malformed(name, f"'{field}' is a JSON {json_type(value)}, not a list")
        for v in value:
            if type(v) is not int:
                raise self._malformed(name, f"'{field}' {printable(str(value), 60)} holds a {json_type(v)}, not an "
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
        info = TensorInfo(name, tuple(shape), code, str(self.path))
        numel = 1
        for d in shape:
            numel *= d
            if numel >= _U64_LIMIT:
                break
        if numel * info.itemsize * 8 >= _U64_LIMIT:
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
                f"{self.path}: tensor {quoted(name)} header says {end - begin} bytes but shape "
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
                    f"{self.path}: tensors {quoted(prev[2])} and {quoted(name)} overlap in the file (data "
                    f"bytes {prev[0]}-{prev[1]} and {begin}-{end}); the file is corrupt{self._twice}")
            if begin > at:
                where = (f"between tensors {quoted(prev[2])} and {quoted(name)}" if prev is not None
                         else f"before the first tensor, {quoted(name)},")
                raise CheckpointError(
                    f"{self.path}: data bytes {at}-{begin} {where} belong to no tensor; the file "
                    f"is corrupt{self._twice}")
            at, prev = end, (begin, end, name)
        if at > data_len:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {quoted(prev[2])} ends at byte "  # type: ignore[index]
                f"{self._data_start + at} but the file has {self._data_start + data_len} bytes "
                f"(or its header is corrupt){self._twice}; re-download it")
        if at < data_len:
            after = f"after the last tensor, {quoted(prev[2])}," if prev is not None else "after a header of no tensors"
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
            with self._opening:  # two threads' first reads open the file once
                if self._fh is None:
                    self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < end - begin:  # preadv may return less than asked for on huge reads
            n = os.preadv(self._fh.fileno(), [view[got:]], self._data_start + begin + got)
            if n <= 0:
                raise CheckpointError(
                    f"{self.path}: short read of tensor {quoted(name)} ({got} of {end - begin} bytes); "
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
