"""Fixtures: tiny real HF-style checkpoint directories built on the fly (see ckpt_helpers.py).

The session-scoped families are read-only inputs: a test that must change a checkpoint copies it
first (``ckpt_helpers.copy_family``); everything a test writes goes under its own ``tmp_path``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # make ckpt_helpers.py importable in any import mode

from ckpt_helpers import SMALL, TINY, Family, make_family, write_recipe  # noqa: E402

from mergewise.synthetic import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def family_f32(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 2 experts, float32, one model.safetensors each. Never modify: copy first."""
    return make_family(tmp_path_factory.mktemp("family_f32"), dtype=torch.float32)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 2 experts, bfloat16, one model.safetensors each. Never modify: copy first."""
    return make_family(tmp_path_factory.mktemp("family_bf16"), dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def family_sharded_f32(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The very same weights as ``family_f32``, written as 2 kB shards + index."""
    return make_family(tmp_path_factory.mktemp("family_sharded_f32"), dtype=torch.float32,
                       shard_size=2_000)


@pytest.fixture(scope="session")
def family_small_f32(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("family_small_f32"), shape=SMALL,
                       dtype=torch.float32)


@pytest.fixture
def single_ckpt(tmp_path: Path) -> Path:
    """One fresh float32 HF directory (a test may modify it)."""
    return write_checkpoint(tmp_path / "single", TINY, seed=1, dtype=torch.float32)


@pytest.fixture
def recipe_file(tmp_path: Path) -> Callable[..., Path]:
    """``recipe_file(data, name="recipe.yaml")`` writes a recipe YAML under tmp_path."""

    def make(data: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
        return write_recipe(tmp_path / name, data)

    return make
