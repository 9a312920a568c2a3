"""Helpers shared by the SVD-based methods' tests (tsv, iso_c, iso_cts): float64 tensors, an
independent polar factor, and a small seeded weight + bias family for API merges."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


def t64(x) -> torch.Tensor:  # noqa: ANN001 - nested lists of numbers
    return torch.tensor(x, dtype=F64)


def inv_sqrt_polar(a: np.ndarray) -> np.ndarray:
    """polar(a) = a (aᵀa)^(-1/2) for a of full column rank (eigh: independent of the SVD)."""
    w, q = np.linalg.eigh(a.T @ a)
    return a @ (q / np.sqrt(w)) @ q.T


def weight_and_bias(rows: int, cols: int, n_models: int, seed: int = 0
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base {w: rows x cols, b: cols} and ``n_models`` experts = base + 0.1 N(0, 1), seeded."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(rows, cols, generator=g), "b": torch.randn(cols, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
              for _ in range(n_models)]
    return base, models


def merged_twice(family, method: str, params: dict, tmp_path):  # noqa: ANN001, ANN201
    """Merge ``family`` with ``method`` through the CLI twice; checks what every such test
    checks (exit 0, the base's tensor names, float32, shapes, identical bytes both times) and
    returns (first output, base tensors, expert tensors)."""
    from ckpt_helpers import load_dir, recipe_for, write_recipe
    from cli_helpers import run_cli
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "r.yaml", recipe_for(family, method, parameters=params))
    outs = []
    for name in ("a", "b"):
        result = run_cli("merge", recipe, "--out", tmp_path / name, "--no-progress")
        assert result.exit_code == 0, result.output
        outs.append(load_dir(tmp_path / name))
    base = load_file(family.base / "model.safetensors")
    experts = [load_file(e / "model.safetensors") for e in family.experts]
    assert sorted(outs[0]) == sorted(base)
    for k, v in outs[0].items():
        assert v.dtype == torch.float32 and v.shape == base[k].shape
        assert torch.equal(v, outs[1][k])  # deterministic
    return outs[0], base, experts
