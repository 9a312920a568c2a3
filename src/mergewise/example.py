"""The built-in example: a tiny Llama-style base, three fine-tuned variants, a TIES merge."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .api import MergeResult, merge
from .synthetic import LlamaShape, write_family

EXAMPLE_SHAPE = LlamaShape(vocab=512, hidden=128, intermediate=344, layers=4, heads=4,
                           kv_heads=2)


def build_example(root: Path) -> Path:
    """Write the example checkpoints and a TIES recipe under ``root``; returns the recipe path."""
    base, experts = write_family(root / "models", EXAMPLE_SHAPE, n_experts=3, seed=0,
                                 dtype=torch.bfloat16)
    recipe = {
        "merge_method": "ties",
        "base_model": str(base.relative_to(root)),
        "models": [{"model": str(e.relative_to(root)), "name": f"task_{i}",
                    "parameters": {"weight": 1.0}} for i, e in enumerate(experts)],
        "parameters": {
            "lambda": 1.0,
            "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.2}],
        },
        "seed": 0,
        "name": "mergewise example (TIES, 3 tasks)",
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_example(root: Path, progress: bool = True) -> MergeResult:
    root.mkdir(parents=True, exist_ok=True)
    recipe = build_example(root)
    return merge(recipe, root / "merged", overwrite=True, progress=progress)
