"""Our safetensors header parser is exactly as strict as the ``safetensors`` library.

``mergewise.checkpoint.SafetensorsFile`` parses headers itself (positional reads keep the resident
set small, see its docstring), so every file is opened both ways here: ours (open, then read
every tensor) and the library's (``safe_open``, then ``get_tensor`` on every key). They must agree
on accept/refuse; when both accept, every tensor is bit-identical; when ours refuses, it raises a
one-line ``CheckpointError`` naming the file, never another exception. Hypothesis generates valid
files and corrupts them one way at a time; the explicit table pins one case per rule (the rules
are listed in docs/reliability.md). The only deliberate difference, dtypes the library knows but
mergewise does not merge (U16, C64, F4...), is refused by us with its own message and never
generated here.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import Family, copy_family, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mergewise.checkpoint import SafetensorsFile, open_checkpoint
from mergewise.errors import CheckpointError

# dtypes both sides read, with their item sizes
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
LIBRARY_ONLY_DTYPES = [b'"U16"', b'"U32"', b'"U64"', b'"C64"', b'"F4"', b'"F6_E2M3"', b'"F6_E3M2"',
                       b'"F8_E8M0"', b'"F8_E4M3FNUZ"', b'"F8_E5M2FNUZ"']
Pairs = list[tuple[str, Any]]  # a JSON object as ordered pairs, so keys may repeat


# --- building files ---------------------------------------------------------------------------

def obj(pairs: Pairs, ascii_only: bool = True) -> str:
    """A JSON object from (key, value) pairs; values that are ``Raw`` are inserted verbatim,
    dicts recursively (so a ``Raw`` may sit inside an entry)."""
    def text(v: Any) -> str:
        if isinstance(v, Raw):
            return v.text
        if isinstance(v, dict):
            return obj(list(v.items()), ascii_only)
        return json.dumps(v, ensure_ascii=ascii_only)
    return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{text(v)}"
                          for k, v in pairs) + "}"


class Raw:
    """JSON text to insert as is (a NaN, a repeated key, a number json.dumps would not write)."""

    def __init__(self, text: str):
        self.text = text


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def blob(header: str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def layout(tensors: list[tuple[str, str, list[int]]]) -> tuple[Pairs, bytes]:
    """Header pairs and data for tensors stored in the given order, contiguous from byte 0."""
    pairs: Pairs = []
    at = 0
    for name, dtype, shape in tensors:
        n = DTYPES[dtype] * math.prod(shape)
        pairs.append((name, entry(dtype, shape, at, at + n)))
        at += n
    return pairs, bytes((i * 7 + 3) % 256 for i in range(at))


# --- opening both ways ------------------------------------------------------------------------

def library(path: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor as the library reads it, or None when it refuses the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except Exception:  # the library raises SafetensorError, and torch errors from get_tensor
        return None


def ours(path: Path) -> dict[str, torch.Tensor] | CheckpointError:
    """Every tensor as mergewise reads it, or the CheckpointError it refuses the file with (any
    other exception propagates and fails the test)."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as exc:
        return exc
    try:
        return {k: f.read(k) for k in f.names()}
    except CheckpointError as exc:
        return exc
    finally:
        f.close()


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def compare(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict | CheckpointError]:
    """Open ``path`` both ways and assert they agree; returns both results."""
    theirs, mine = library(path), ours(path)
    if isinstance(mine, CheckpointError):
        msg = str(mine)
        assert "\n" not in msg and str(path) in msg, msg
        assert theirs is None, f"we refuse a file the library reads: {msg}"
        return theirs, mine
    assert theirs is not None, f"we read a file the library refuses: {sorted(mine)}"
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert (mine[name].dtype, tuple(mine[name].shape)) == (t.dtype, tuple(t.shape)), name
        assert raw_bytes(mine[name]) == raw_bytes(t), name
    return theirs, mine


# --- hypothesis: valid files and one corruption at a time ---------------------------------------

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12).filter(
    lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)
def tensor_lists(min_size: int = 0) -> st.SearchStrategy[list[tuple[str, str, list[int]]]]:
    return st.lists(st.tuples(names, st.sampled_from(sorted(DTYPES)), shapes), min_size=min_size,
                    max_size=6, unique_by=lambda t: t[0])
metadata = st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


@st.composite
def valid_files(draw: st.DrawFn, min_tensors: int = 0) -> tuple[Pairs, bytes, str, str]:
    """(pairs of the header in some key order, data, leading and trailing JSON whitespace)."""
    tensors = draw(tensor_lists(min_tensors))
    pairs, data = layout(tensors)  # stored in the drawn order...
    pairs = draw(st.permutations(pairs))  # ...listed in another
    meta = draw(metadata)
    if meta is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", meta))
    ws = st.text(st.sampled_from(" \t\r\n"), max_size=3)
    return pairs, data, draw(ws), draw(ws)


def _tensor_index(draw: st.DrawFn, pairs: Pairs, not_at_start: bool = False) -> int | None:
    idx = [i for i, (k, v) in enumerate(pairs) if k != "__metadata__"
           and not (not_at_start and v["data_offsets"][0] == 0)]
    return draw(st.sampled_from(idx)) if idx else None


def _set(pairs: Pairs, i: int, **changes: Any) -> Pairs:
    out = list(pairs)
    out[i] = (out[i][0], {**out[i][1], **changes})
    return out


BAD_DIMS = [-1, -4, 2.0, "4", True, None, [2], 10**15, 2**64, 2**63]
BAD_OFFSETS = [[0], [0, 1, 2], [0.0, 4], ["0", "4"], None, {"0": 4}, [-1, 3]]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid file with at most one corruption: (what was done, the file's bytes)."""
    pairs, data, lead, trail = draw(valid_files(min_tensors=1))
    valid = blob(lead + obj(pairs) + trail, data)
    kind = draw(st.sampled_from([
        "none", "overlap", "gap", "shift", "trailing", "missing", "swap", "numel", "dim",
        "offsets", "dtype", "duplicate", "duplicate-metadata", "metadata-type", "not-object",
        "not-utf8", "header-len", "header-short", "nan", "surrogate", "deep", "flip"]))
    i = _tensor_index(draw, pairs, not_at_start=kind == "overlap")
    header_len = None
    if kind in ("overlap", "gap", "shift", "swap", "numel", "dim", "offsets", "dtype") and i is None:
        kind = "none"
    if kind in ("overlap", "gap", "shift"):
        b, e = pairs[i][1]["data_offsets"]
        delta = draw(st.integers(1, 8))
        delta = -min(delta, b) if kind == "overlap" else delta
        pairs = _set(pairs, i, data_offsets=[b + delta, e + delta])
        if kind == "gap":  # keep the file length: the gap must be the fault, not the size
            data += bytes(delta)
    elif kind == "trailing":
        data += bytes(draw(st.integers(1, 9)))
    elif kind == "missing" and data:
        data = data[:-draw(st.integers(1, len(data)))]
    elif kind == "swap":
        b, e = pairs[i][1]["data_offsets"]
        pairs = _set(pairs, i, data_offsets=[e + 1, b])
    elif kind == "numel":
        pairs = _set(pairs, i, shape=[*pairs[i][1]["shape"], draw(st.integers(2, 3))])
    elif kind == "dim":
        pairs = _set(pairs, i, shape=[*pairs[i][1]["shape"], draw(st.sampled_from(BAD_DIMS))])
    elif kind == "offsets":
        pairs = _set(pairs, i, data_offsets=draw(st.sampled_from(BAD_OFFSETS)))
    elif kind == "dtype":
        pairs = _set(pairs, i, dtype=draw(st.sampled_from(["Q4", "f32", "", "FLOAT", 4, None])))
    elif kind == "duplicate" and pairs:
        k, v = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (k, draw(st.sampled_from(
            [v, {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}]))))
    elif kind == "duplicate-metadata":
        pairs += [("__metadata__", {}), ("__metadata__", {"a": "b"})]
    elif kind == "metadata-type":
        pairs.append(("__metadata__", draw(st.sampled_from([[], "x", 3, {"k": 1}, {"k": None}]))))
    elif kind == "nan" and i is not None:
        pairs = _set(pairs, i, extra=Raw(draw(st.sampled_from(["NaN", "Infinity", "1e999"]))))
    elif kind == "surrogate":
        pairs.append(("\\ud800", Raw('{"dtype":"U8","shape":[0],"data_offsets":[0,0]}')))
    elif kind == "deep" and i is not None:
        depth = draw(st.integers(120, 130))
        pairs = _set(pairs, i, extra=Raw("[" * depth + "]" * depth))
    text = obj(pairs, draw(st.booleans())).replace('"\\\\ud800"', '"\\ud800"')
    if kind == "not-object":
        text = draw(st.sampled_from(["[]", "null", "3", '"x"', f"[{text}]"]))
    header = (lead + text + trail).encode()
    if kind == "not-utf8":
        at = draw(st.integers(0, len(header)))
        header = header[:at] + draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"])) + \
            header[at:]
    if kind == "header-len":
        header_len = draw(st.sampled_from([len(header) + len(data) + 1, 100_000_001, 2**63,
                                           2**64 - 1]))
    if kind == "header-short":
        header_len = draw(st.integers(0, len(header) - 1))
    out = blob(header, data, header_len)
    if kind == "flip":
        at = draw(st.integers(0, len(out) - 1))
        out = out[:at] + bytes([out[at] ^ draw(st.integers(1, 255))]) + out[at + 1:]
    return (kind if out != valid else f"none ({kind} did nothing)"), out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(case=corrupted())
def test_parser_agrees_with_the_library(tmp_path: Path, case: tuple[str, bytes]) -> None:
    kind, data = case
    # a flipped byte can turn F16 into U16, F64 into C64...: dtypes the library reads and
    # mergewise deliberately does not; those files are not a disagreement to look for here
    assume(not any(code in data for code in LIBRARY_ONLY_DTYPES))
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    theirs, _ = compare(path)
    event(f"{kind}: {'accepted' if theirs is not None else 'refused'}")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=valid_files())
def test_valid_files_are_read_bit_identically(tmp_path: Path, case: tuple[Pairs, bytes, str, str]
                                              ) -> None:
    pairs, data, lead, trail = case
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob(lead + obj(pairs) + trail, data))
    theirs, mine = compare(path)
    assert theirs is not None and not isinstance(mine, CheckpointError)


# --- explicit cases, one per rule ---------------------------------------------------------------

U8 = '"dtype":"U8","shape":[4],"data_offsets":[0,4]'
D4 = bytes([1, 2, 3, 4])


def J(template: str, extra: str = "") -> str:
    """JSON text from a template: ``<E>`` is a valid 4-byte U8 entry's fields, ``<X>`` ``extra``."""
    return template.replace("<E>", U8).replace("<X>", extra)
A = entry("U8", [4], 0, 4)

# id, file bytes, what our message must say (None: both sides accept the file)
CASES: list[tuple[str, bytes, str | None]] = [
    ("valid", blob(obj([("a", A)]), D4), None),
    ("empty-header-object", blob("{}"), None),
    ("no-metadata-null", blob(obj([("__metadata__", None), ("a", A)]), D4), None),
    ("leading-and-trailing-whitespace", blob(J(' \n\t{"a":{<E>}}\r '), D4), None),
    ("space-padding-like-writers", blob(obj([("a", A)]) + " " * 7, D4), None),
    ("zero-size-at-start", blob(obj([("z", entry("F32", [0, 3], 0, 0)), ("a", A)]), D4), None),
    ("zero-size-at-end", blob(obj([("a", A), ("z", entry("F32", [0], 4, 4))]), D4), None),
    ("two-zero-size-same-offset", blob(obj([("z", entry("U8", [0], 0, 0)),
                                            ("y", entry("I8", [2, 0], 0, 0))])), None),
    ("scalar", blob(obj([("s", entry("U8", [], 0, 1))]), b"\x07"), None),
    ("keys-not-in-offset-order", blob(obj([("b", entry("U8", [2], 2, 4)),
                                           ("a", entry("U8", [2], 0, 2))]), D4), None),
    ("repeated-identical-entry", blob(J('{"a":{<E>},"a":{<E>}}'), D4), None),
    ("repeated-name-last-wins", blob(J('{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},'
                                       '"a":{<E>}}'), D4), None),
    ("repeated-metadata-key", blob('{"__metadata__":{"k":"1","k":"2"}}'), None),
    ("unknown-entry-field", blob(J('{"a":{<E>,"x":[1,{"y":null}]}}'), D4), None),
    ("entry-as-list", blob('{"a":["U8",[4],[0,4]]}', D4), None),
    ("dtype-as-unit-map", blob('{"a":{"dtype":{"U8":null},"shape":[4],"data_offsets":[0,4]}}',
                               D4), None),
    ("escaped-name", blob(J('{"\\u0061\\ud83d\\ude00":{<E>}}'), D4), None),
    ("zero-size-dims-overflow-after-zero", blob(obj([("z", entry("U8", [0, 2**40, 2**40], 0, 0))])),
     None),
    ("nesting-125-in-extra", blob(J('{"a":{<E>,"x":<X>}}', "[" * 125 + "]" * 125), D4), None),
    # refused
    ("empty-file", b"", "shorter than the 8-byte header length"),
    ("header-length-only", struct.pack("<Q", 0), "not valid JSON"),
    ("header-length-beyond-file", blob(obj([("a", A)]), D4, header_len=500), "header claims 500"),
    ("header-length-over-limit", blob("{}", header_len=100_000_001), "limit of 100,000,000"),
    ("header-length-2^64-1", blob("{}", header_len=2**64 - 1), "limit of 100,000,000"),
    ("header-not-utf8", blob(J('{"a<FF>":{<E>}}').encode().replace(b"<FF>", b"\xff"), D4), "not UTF-8"),
    ("header-overlong-utf8", blob(J('{"<FF>":{<E>}}').encode().replace(b"<FF>", b"\xc0\xaf"), D4), "not UTF-8"),
    ("header-utf8-bom", blob(b"\xef\xbb\xbf{}"), "not valid JSON"),
    ("header-not-json", blob('{"a":'), "not valid JSON"),
    ("header-trailing-nul-padding", blob("{}\0\0"), "not valid JSON"),
    ("header-list", blob("[]"), "a JSON list, not an object"),
    ("header-null", blob("null"), "a JSON null, not an object"),
    ("nan-in-extra-field", blob(J('{"a":{<E>,"x":NaN}}'), D4), "NaN is not JSON"),
    ("number-out-of-f64-range", blob(J('{"a":{<E>,"x":1e999}}'), D4), "out of range"),
    ("lone-surrogate-escape", blob(J('{"\\ud800":{<E>}}'), D4), "lone surrogate"),
    ("nesting-126-in-extra", blob(J('{"a":{<E>,"x":<X>}}', "[" * 126 + "]" * 126), D4),
     "nests deeper"),
    ("nesting-100000", blob(J('{"a":{<E>,"x":<X>}}', "[" * 100000 + "]" * 100000), D4),
     "nested too deeply"),
    ("metadata-twice", blob('{"__metadata__":{},"__metadata__":{}}'), "__metadata__ appears twice"),
    ("metadata-number-value", blob(obj([("__metadata__", {"k": 1})])), "gives 'k' a JSON number"),
    ("metadata-nested", blob(obj([("__metadata__", {"k": {"x": "y"}})])), "gives 'k' a JSON object"),
    ("metadata-list", blob(obj([("__metadata__", [])])), "__metadata__ is a JSON list"),
    ("entry-field-twice", blob(J('{"a":{"dtype":"U8",<E>}}'), D4), "'dtype' given twice"),
    ("entry-missing-shape", blob(obj([("a", {"dtype": "U8", "data_offsets": [0, 4]})]), D4),
     "no 'shape'"),
    ("entry-null", blob(obj([("a", None)])), "a JSON null, not an object"),
    ("entry-list-of-4", blob('{"a":["U8",[4],[0,4],1]}', D4), "a list of 4 items"),
    ("unknown-dtype", blob(obj([("a", entry("Q4", [4], 0, 4))]), D4), "dtype Q4"),
    ("lowercase-dtype", blob(obj([("a", entry("f32", [1], 0, 4))]), D4), "dtype f32"),
    ("dtype-map-two-keys", blob('{"a":{"dtype":{"U8":null,"I8":null},"shape":[4],'
                                '"data_offsets":[0,4]}}', D4), "dtype is a JSON object"),
    ("shape-negative", blob(obj([("a", entry("U8", [-4], 0, 4))]), D4), "negative number in its shape"),
    ("shape-float", blob(obj([("a", entry("U8", [4.0], 0, 4))]), D4), "holds a number, not an integer"),
    ("shape-minus-zero", blob('{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
     "holds a number, not an integer"),
    ("shape-string", blob(obj([("a", entry("U8", ["4"], 0, 4))]), D4), "holds a string"),
    ("shape-bool", blob(obj([("a", entry("U8", [True], 0, 1))]), b"\x01"), "holds a boolean"),
    ("shape-not-list", blob(obj([("a", entry("U8", 4, 0, 4))]), D4),  # type: ignore[arg-type]
     "'shape' is a JSON number"),
    ("shape-2^64", blob(obj([("a", entry("U8", [2**64], 0, 4))]), D4), "beyond 64 bits"),
    ("shape-overflow-u64", blob(obj([("a", entry("U8", [2**32, 2**32], 0, 4))]), D4),
     "overflows 64 bits"),
    ("shape-overflow-before-zero", blob(obj([("z", entry("U8", [2**40, 2**40, 0], 0, 0))])),
     "overflows 64 bits"),
    ("shape-overflow-of-bits", blob(obj([("z", entry("F64", [2**61], 0, 2**64 - 1))])),
     "overflows 64 bits"),
    ("shape-dim-beyond-int64", blob(obj([("z", entry("U8", [0, 2**63], 0, 0))])),
     "beyond torch's limit"),
    ("shape-zero-size-unstridable", blob(obj([("z", entry("F32", [0, 2**63 - 1, 2], 0, 0))])),
     "which torch cannot hold"),
    ("shape-10^15-elements", blob(obj([("w", entry("F32", [10**15], 0, 4 * 10**15))]), D4),
     "truncated file: tensor 'w'"),
    ("shape-10^15-elements-4-bytes", blob(obj([("w", entry("F32", [10**15], 0, 4))]), D4),
     "needs 4000000000000000"),
    ("offsets-one", blob(obj([("a", {"dtype": "U8", "shape": [4], "data_offsets": [4]})]), D4),
     "is not [begin, end]"),
    ("offsets-three", blob(obj([("a", {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 4]})]),
                           D4), "is not [begin, end]"),
    ("offsets-float", blob(obj([("a", {"dtype": "U8", "shape": [4], "data_offsets": [0, 4.0]})]),
                           D4), "holds a number"),
    ("offsets-negative", blob(obj([("a", entry("U8", [4], -4, 0))]), D4),
     "negative number in its data_offsets"),
    ("begin-after-end", blob(obj([("a", entry("U8", [0], 4, 0))]), D4), "end before they begin"),
    ("byte-count-not-numel", blob(obj([("a", entry("U8", [3], 0, 4))]), D4), "needs 3"),
    ("overlap", blob(obj([("a", entry("U8", [8], 0, 8)), ("b", entry("U8", [8], 4, 12))]),
                     bytes(12)), "tensors 'a' and 'b' overlap in the file (data bytes 0-8 and 4-12)"),
    ("same-range", blob(obj([("a", A), ("b", A)]), D4), "tensors 'a' and 'b' overlap"),
    ("zero-size-inside-another", blob(obj([("a", entry("U8", [8], 0, 8)),
                                           ("z", entry("U8", [0], 4, 4))]), bytes(8)),
     "tensors 'a' and 'z' overlap"),
    ("gap", blob(obj([("a", entry("U8", [4], 0, 4)), ("b", entry("U8", [4], 5, 9))]), bytes(9)),
     "data bytes 4-5 between tensors 'a' and 'b' belong to no tensor"),
    ("first-not-at-0", blob(obj([("a", entry("U8", [4], 4, 8))]), bytes(8)),
     "data bytes 0-4 before the first tensor, 'a', belong to no tensor"),
    ("trailing-bytes", blob(obj([("a", A)]), D4 + b"junk"), "4 bytes at the end of the file"),
    ("trailing-bytes-no-tensors", blob("{}", b"junk"), "after a header of no tensors"),
    ("missing-bytes", blob(obj([("a", entry("U8", [8], 0, 8))]), D4), "truncated file: tensor 'a'"),
    ("repeated-name-pointing-elsewhere", blob(J('{"a":{<E>},"b":{"dtype":"U8","shape":[4],'
                                              '"data_offsets":[4,8]},"a":{"dtype":"U8",'
                                              '"shape":[4],"data_offsets":[4,8]}}'), bytes(8)),
     "is listed more than once; the last entry counts"),
]


@pytest.mark.parametrize("data, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(tmp_path: Path, data: bytes, expect: str | None) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    theirs, mine = compare(path)
    if expect is None:
        assert theirs is not None
    else:
        assert isinstance(mine, CheckpointError) and expect in str(mine), str(mine)


def test_huge_or_negative_shapes_fail_at_open_without_allocating(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """A header that declares a 10^15-element tensor, or a negative dimension, fails when the
    checkpoint is opened, in one line, and nothing tries to allocate the declared size."""
    real_empty = torch.empty

    def guarded_empty(*size: Any, **kw: Any) -> torch.Tensor:
        dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        assert math.prod(dims) < 10**9, f"torch.empty{size}"
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    for name, shape, end, needle in [("huge", [10**15], 4 * 10**15, "truncated file: tensor 'huge'"),
                                     ("huge2", [10**5, 10**5, 10**5], 4 * 10**15, "'huge2'"),
                                     ("neg", [-3, 4], 48, "negative number in its shape [-3, 4]")]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob(obj([(name, entry("F32", shape, 0, end))]), bytes(16)))
        with pytest.raises(CheckpointError) as exc:
            open_checkpoint(path)
        assert str(exc.value).count("\n") == 0 and str(path) in str(exc.value)
        assert needle in str(exc.value), str(exc.value)


# --- the CLI: a corrupt expert fails the merge in one line and writes nothing --------------------

def rewrite_header(path: Path, edit: Callable[[dict[str, Any]], str]) -> None:
    """Rewrite a safetensors file's header with ``edit(header) -> JSON text``, same data."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    path.write_bytes(blob(edit(header), data[8 + n:]))


def overlap_second(header: dict[str, Any]) -> str:
    """The second tensor in the file moved 4 bytes back, onto the first (same byte count)."""
    order = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"][0])
    b, e = header[order[1]]["data_offsets"]
    header[order[1]]["data_offsets"] = [b - 4, e - 4]
    return json.dumps(header)


def duplicate_onto_other(header: dict[str, Any]) -> str:
    """A tensor listed again at the end, pointing at the bytes of another of its shape: the
    last entry counts (json and the library agree), so it would read the other's values."""
    names = [k for k in header if k != "__metadata__"]
    a, b = next((a, b) for a in names for b in names
                if a != b and header[a]["shape"] == header[b]["shape"])
    return json.dumps(header)[:-1] + f",{json.dumps(b)}:{json.dumps(header[a])}}}"


@pytest.mark.parametrize("edit, needles", [
    (overlap_second, ["overlap in the file"]),
    (duplicate_onto_other, ["overlap in the file", "is listed more than once"]),
], ids=["overlapping-offsets", "repeated-name"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
def test_merge_with_corrupt_expert_fails_in_one_line(family_f32: Family, tmp_path: Path,
                                                     edit: Callable[[dict[str, Any]], str],
                                                     needles: list[str], dry_run: bool) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    bad = fam.experts[1] / "model.safetensors"
    rewrite_header(bad, edit)
    assert library(bad) is None  # the library refuses the file too
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(fam, "ties"))
    out = tmp_path / "out"
    result = run_cli("merge", recipe, *(["--dry-run"] if dry_run else ["--out", out]))
    assert_one_line_error(result, str(bad), *needles)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam", "recipe.yaml"]
