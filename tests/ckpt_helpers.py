"""Helpers shared by the test files: tiny checkpoint families, recipe writing, file hashes."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergewise.synthetic import LlamaShape, write_family

# 21 tensors, 4,944 parameters: every test merge takes milliseconds.
TINY = LlamaShape(vocab=32, hidden=16, intermediate=24, layers=2, heads=2, kv_heads=1)
# ~87 kB in float32: big enough that --shard-size 20KB gives several shards.
SMALL = LlamaShape(vocab=64, hidden=32, intermediate=48, layers=2, heads=2, kv_heads=1)


@dataclass(frozen=True)
class Family:
    """A base checkpoint directory and fine-tuned variants of it."""

    root: Path
    base: Path
    experts: list[Path]
    shape: LlamaShape
    dtype: torch.dtype

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.experts]


def make_family(root: Path, shape: LlamaShape = TINY, n_experts: int = 2,
                dtype: torch.dtype = torch.float32, seed: int = 0,
                shard_size: int = 5_000_000_000) -> Family:
    base, experts = write_family(root, shape, n_experts, seed=seed, dtype=dtype,
                                 shard_size=shard_size)
    return Family(root, base, experts, shape, dtype)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def copy_family(fam: Family, root: Path) -> Family:
    """A writable copy of a family (for tests that corrupt or edit an input)."""
    shutil.copytree(fam.root, root)
    return Family(root, root / fam.base.name, [root / e.name for e in fam.experts], fam.shape,
                  fam.dtype)


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory (single or sharded), read with the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def edit_weights(directory: Path, edit: Any) -> None:
    """Rewrite ``directory/model.safetensors`` after ``edit(tensors_dict)`` changed it in place."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def write_recipe(path: Path, data: dict[str, Any] | str) -> Path:
    """Write a recipe as YAML (a dict is dumped; a string is written as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_for(fam: Family, method: str = "ties", **extra: Any) -> dict[str, Any]:
    """A recipe dict merging every expert of ``fam`` onto its base (absolute paths)."""
    data: dict[str, Any] = {"merge_method": method, "base_model": str(fam.base),
                            "models": [{"model": str(e)} for e in fam.experts]}
    data.update(extra)
    return data


def tree_hashes(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime_ns of every file under ``root`` (to prove inputs are never modified)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                             p.stat().st_mtime_ns)
    return out


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary or backup directories the writer may have left next to output ``name``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))
