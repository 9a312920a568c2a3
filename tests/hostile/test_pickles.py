"""Hostile and broken ``.bin/.pt`` files: a pickle that needs code is refused and never runs;
a corrupt one is reported as corrupt. Both in one line naming the file.

Every hostile payload is live: each test first proves, with a marker file in its own tmp dir,
that an unsafe load (``torch.load(weights_only=False)`` or ``pickle.loads``) runs it. Then
mergewise must refuse the file as "needs code to run", naming what the pickle references, and
the marker must not appear. The classification comes from a static disassembly of the pickle
(``pickletools``), not from torch's wording, which changes between versions.
"""

from __future__ import annotations

import functools
import os
import pickle
import shlex
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ckpt_helpers import Family, copy_family, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file

from mergewise.checkpoint import open_checkpoint
from mergewise.errors import CheckpointError

NEEDS_CODE = "refused to load: this pickle needs code to run"
CORRUPT = "corrupt or not a pickle"


# --- payloads: each creates ``marker`` when unpickled unsafely ------------------------------------

class SystemCall:
    """``__reduce__`` to ``os.system``: the classic shell payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class ExecCall(SystemCall):
    """``__reduce__`` to ``exec`` (no shell)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class PrintCall(SystemCall):
    """``__reduce__`` to ``print`` of a marker line (checked on captured stdout)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, (f"PWNED {self.marker}",))


class PartialCall(SystemCall):
    """``__reduce__`` to a ``functools.partial`` bound to ``exec``: the callable is itself an
    object the unpickler must build."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial(exec, f"open({str(self.marker)!r}, 'w').close()"), ())


class Config:
    """An instance of a custom class whose ``__setstate__`` has a side effect."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, Any]) -> None:
        open(state["marker"], "w").close()  # noqa: SIM115
        self.__dict__.update(state)


class TinyModel(torch.nn.Module):
    """A whole module saved with ``torch.save(model)``; unpickling it rebuilds the class."""

    def __init__(self, marker: Path):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, Any]) -> None:
        open(state["marker"], "w").close()  # noqa: SIM115
        super().__setstate__(state)


def save_zip(obj: object, path: Path, **kw: Any) -> None:
    torch.save(obj, path, **kw)


def save_legacy(obj: object, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def save_bare_pickle(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=4))  # STACK_GLOBAL, not GLOBAL


def write_eval_global(marker: Path, path: Path) -> None:
    """A hand-written protocol-0 pickle: GLOBAL builtins.eval, called on a string."""
    code = f"open({str(marker)!r}, 'w').close()"
    path.write_bytes(b"cbuiltins\neval\n(V" + code.encode() + b"\ntR.")


def write_inst(marker: Path, path: Path) -> None:
    """A hand-written protocol-0 INST opcode: builds ``os.system(cmd)`` with no GLOBAL at all."""
    path.write_bytes(b"(V" + f"touch {shlex.quote(str(marker))}".encode() + b"\nios\nsystem\n.")


def tensors_and(payload: object) -> dict[str, object]:
    return {"w": torch.ones(2), "extra": payload}


# id, writer(marker, path), a name the message must give
VARIANTS: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("reduce-os-system", lambda m, p: save_zip(tensors_and(SystemCall(m)), p), "system"),
    ("reduce-exec", lambda m, p: save_zip(tensors_and(ExecCall(m)), p), "builtins.exec"),
    ("reduce-print", lambda m, p: save_zip(tensors_and(PrintCall(m)), p), "builtins.print"),
    ("functools-partial", lambda m, p: save_zip(tensors_and(PartialCall(m)), p),
     "functools.partial"),
    ("custom-class-instance", lambda m, p: save_zip(tensors_and(Config(m)), p), "Config"),
    ("nested-in-state-dict", lambda m, p: save_zip({"state_dict": {"w": torch.ones(2)},
                                                    "config": Config(m)}, p), "Config"),
    ("whole-nn-module", lambda m, p: save_zip(TinyModel(m), p), "TinyModel"),
    ("numpy-object-array", lambda m, p: save_zip(tensors_and(np.array([Config(m)], dtype=object)),
                                                 p), "numpy"),
    ("legacy-format-reduce", lambda m, p: save_legacy(tensors_and(ExecCall(m)), p),
     "builtins.exec"),
    ("bare-pickle-protocol-4", lambda m, p: save_bare_pickle({"w": ExecCall(m)}, p),
     "builtins.exec"),
    ("global-builtins-eval", write_eval_global, "builtins.eval"),
    ("inst-opcode", write_inst, "os.system"),
]


def unsafe_load(path: Path) -> None:
    """What a careless loader does: torch.load without weights_only, else plain pickle."""
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pickle.loads(path.read_bytes())


@pytest.mark.parametrize("write, names", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_pickle_that_needs_code_is_refused_and_never_runs(
        tmp_path: Path, capfd: pytest.CaptureFixture[str],
        write: Callable[[Path, Path], None], names: str) -> None:
    live = tmp_path / "live-marker"
    write(live, tmp_path / "live.bin")
    unsafe_load(tmp_path / "live.bin")
    assert live.exists() or "PWNED" in capfd.readouterr().out  # the payload is real

    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    write(marker, path)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert NEEDS_CODE in msg and "weights_only=True" in msg and CORRUPT not in msg
    assert names in msg, msg
    assert not marker.exists()
    assert "PWNED" not in capfd.readouterr().out


# --- corrupt files: "corrupt or not a pickle", never "needs code" --------------------------------

def _zip_ok(path: Path) -> bytes:
    torch.save({"w": torch.arange(6.0)}, path)
    return path.read_bytes()


def _legacy_ok(path: Path) -> bytes:
    save_legacy({"w": torch.arange(6.0)}, path)
    return path.read_bytes()


def _zip_without_data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/version", "3\n")
    return path.read_bytes()


CORRUPTIONS: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("empty", lambda p: b"", "the file is empty"),
    ("garbage", lambda p: b"\x80\x02garbage" * 20, CORRUPT),
    ("text", lambda p: b"hello world\n", CORRUPT),  # torch lets a KeyError out of this one
    ("json", lambda p: b'{"w": [1, 2, 3]}', CORRUPT),
    ("safetensors-renamed", lambda p: struct.pack("<Q", 2) + b"{}", CORRUPT),
    ("random-bytes", lambda p: bytes((i * 131 + 7) % 256 for i in range(4096)), CORRUPT),
    ("fake-zip", lambda p: b"PK\x03\x04 not a zip", "damaged zip archive"),
    ("zip-truncated", lambda p: _zip_ok(p)[:300], "damaged zip archive"),
    ("zip-without-data-pkl", _zip_without_data_pkl, "without data.pkl"),
    ("legacy-truncated", lambda p: _legacy_ok(p)[:150], CORRUPT),
    ("pickle-truncated", lambda p: pickle.dumps({"a": 1}, protocol=2)[:-3], CORRUPT),
]


@pytest.mark.parametrize("make, expect", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_file_is_reported_as_corrupt(tmp_path: Path, make: Callable[[Path], bytes],
                                             expect: str) -> None:
    path = tmp_path / "model.pt"
    data = make(tmp_path / "scratch.pt")
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a readable PyTorch checkpoint")
    assert expect in msg and "needs code" not in msg, msg


def test_zip_missing_a_tensor_record_is_not_called_unsafe(tmp_path: Path) -> None:
    """The pickle is complete and references only tensor plumbing, but the archive lacks the
    record of the tensor's bytes: torch's own reason is given, not 'needs code', not a
    traceback."""
    whole, path = tmp_path / "whole.pt", tmp_path / "model.pt"
    torch.save({"w": torch.arange(1000.0)}, whole)
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/0"):
                dst.writestr(item, src.read(item))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a readable PyTorch checkpoint (torch: ")
    assert "needs code" not in msg and CORRUPT not in msg


def test_protocol_4_state_dict_is_explained(tmp_path: Path) -> None:
    """A legitimate state dict saved with pickle protocol 4 is not unsafe and not corrupt:
    torch's safe loader cannot read it, and the message says how to re-save it."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = str(exc.value)
    assert "pickle protocol 4" in msg and "needs code" not in msg and CORRUPT not in msg


@pytest.mark.parametrize("save", [save_zip, save_legacy], ids=["zip", "legacy"])
def test_plain_state_dicts_still_load(tmp_path: Path, save: Callable[[object, Path], None]) -> None:
    path = tmp_path / "model.pt"
    values = torch.arange(6.0).reshape(2, 3)
    save({"w": values, "step": 3, "names": ["a"]}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.names() == ["w"]
        assert torch.equal(ckpt.read("w"), values)


# --- the CLI -------------------------------------------------------------------------------------

def bin_expert(fam: Family, index: int, payload: object) -> Path:
    """Expert ``index`` of ``fam`` rewritten as pytorch_model.bin with ``payload`` next to its
    tensors."""
    d = fam.experts[index]
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save({**tensors, "extra": payload}, d / "pytorch_model.bin")
    return d / "pytorch_model.bin"


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
def test_merge_with_hostile_expert_fails_in_one_line(family_f32: Family, tmp_path: Path,
                                                     dry_run: bool) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    marker = tmp_path / "marker"
    bad = bin_expert(fam, 1, ExecCall(marker))
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(fam, "ties"))
    out = tmp_path / "out"
    result = run_cli("merge", recipe, *(["--dry-run"] if dry_run else ["--out", out]))
    assert_one_line_error(result, str(bad), NEEDS_CODE, "builtins.exec")
    assert not marker.exists() and not out.exists()


def test_merge_with_protocol_4_expert_prints_no_torch_warning(family_f32: Family,
                                                              tmp_path: Path) -> None:
    """torch warns about an unusual pickle protocol; that must not reach the user next to the
    one error line (the warning is silenced, and none escapes to the warnings machinery)."""
    fam = copy_family(family_f32, tmp_path / "fam")
    d = fam.experts[0]
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(tensors, d / "pytorch_model.bin", pickle_protocol=4)
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(fam, "ties"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("merge", recipe, "--out", tmp_path / "out")
    assert_one_line_error(result, str(d / "pytorch_model.bin"), "pickle protocol 4")
    assert [str(w.message) for w in caught] == []
