"""Lazy, read-only access to checkpoints, one tensor at a time.

Formats: a Hugging Face directory (``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors``
with ``model.safetensors.index.json``, or ``pytorch_model.bin[.index.json]``), a single
``.safetensors`` file (``safetensors_file.py``: our own strict parser and positional reads), or a
PyTorch ``.bin/.pt/.pth`` state dict (``torch_files.py``: ``weights_only=True``, a pickle that
needs code is refused, never executed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line, quoted
from .safetensors_file import SafetensorsFile, json_type, parse_safetensors_header  # noqa: F401
from .tensors import TensorInfo
from .torch_files import load_torch_file


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
        raise CheckpointError(f"{path}: config.json is a JSON {json_type(cfg)}, not an object; "
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
        return (f"has quantization_config {json.dumps(quant)[:40]} (a JSON {json_type(quant)}), "
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
                        f"{label}: tensor {quoted(name)} appears in both {self._where[name].path.name} "
                        f"and {f.path.name}; the shards are inconsistent"
                    )
                self._where[name] = f
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise CheckpointError(
                    f"{label}: the index lists {len(missing)} tensor(s) absent from the shards "
                    f"(first: {quoted(missing[0])}); the download is incomplete"
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
                f"{label}: entry {quoted(bad[0])} is a {type(tensors[bad[0]]).__name__}, not a tensor"
            )
        self._tensors = dict(tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, self.label)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


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
        tensors.update(load_torch_file(directory / s))
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
                return StateDictCheckpoint(label, load_torch_file(p / name), p)
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
        return StateDictCheckpoint(label, load_torch_file(p), None)
    raise CheckpointError(
        f"{p}: not a checkpoint (expected a directory, .safetensors, .bin, .pt or .pth)"
    )

