"""PyTorch ``.bin/.pt/.pth`` state dicts, loaded with ``weights_only=True``: a pickle that needs
code is refused, never executed. A file that ``weights_only`` loading refuses is told apart, by a
static disassembly of its pickle (nothing runs), as one that needs code (it references globals
outside torch's allowlist) or one that is corrupt (the pickle is incomplete or not a pickle).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, first_line

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


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
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
