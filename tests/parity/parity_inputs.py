"""What a corpus recipe feeds each tensor: its models' deltas, densities and the base.

The top-k and distribution checks need the inputs, not just the two outputs: which |delta|
values sit at a selection threshold, and each tool's merged delta relative to the base. This
reads the recipe as mergekit does for the few cases the corpus uses (scalar parameters, a model's
own ``parameters`` over the global ones over mergekit's defaults; the base never counts as a
task model) and the checkpoints with the safetensors library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from parity_compare import Output, Sample, breadcrumbs_cuts, magnitude_cuts
from safetensors.torch import load_file

MAGNITUDE = ("ties", "task_arithmetic")
BREADCRUMBS = ("breadcrumbs", "breadcrumbs_ties")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RecipeInputs:
    """A rendered recipe with its checkpoints loaded lazily."""

    recipe: dict[str, Any]
    _cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str) -> RecipeInputs:
        return cls(yaml.safe_load(text))

    def _weights(self, path: str) -> dict[str, torch.Tensor]:
        if path not in self._cache:
            self._cache[path] = load_file(Path(path) / "model.safetensors")
        return self._cache[path]

    @property
    def base(self) -> str:
        return self.recipe["base_model"]

    @property
    def union_tokenizer(self) -> bool:
        """Whether mergekit builds a union vocabulary (new-token ids vary run to run, so
        vocabulary rows are compared by token string)."""
        block = self.recipe.get("tokenizer")
        return self.recipe.get("tokenizer_source") == "union" or (
            isinstance(block, dict) and block.get("source", "union") == "union")

    @property
    def task_models(self) -> list[dict[str, Any]]:
        """Non-base ``models:`` entries, in order."""
        return [m for m in self.recipe.get("models", []) if m["model"] != self.base]

    def param(self, model: dict[str, Any], key: str, default: Any) -> Any:
        own = (model.get("parameters") or {}).get(key)
        if own is not None:
            return own
        value = (self.recipe.get("parameters") or {}).get(key)
        return default if value is None else value

    def delta(self, model: dict[str, Any], name: str) -> torch.Tensor:
        """model - base for one tensor, computed in the compute dtype (``dtype``, else the
        stored one), as both tools compute it."""
        m, b = self._weights(model["model"])[name], self._weights(self.base)[name]
        dt = DTYPES.get(self.recipe.get("dtype", ""), m.dtype)
        return m.to(dt) - b.to(dt)

    def selection(self, name: str) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Each task model's delta and the (mergekit k, mergewise k) cuts of its trim."""
        method = self.recipe["merge_method"]
        out = []
        for model in self.task_models:
            d = self.delta(model, name)
            density = float(self.param(model, "density", 1.0))
            if method in MAGNITUDE:
                cuts = magnitude_cuts(d.numel(), density)
            elif method in BREADCRUMBS:
                cuts = breadcrumbs_cuts(d.numel(), density, float(self.param(model, "gamma", 0.01)))
            else:
                raise ValueError(f"no top-k rule for merge_method {method}")
            out.append((d, cuts))
        return out

    def sample(self, name: str, output: Output) -> Sample:
        """One tool's merged delta of ``name`` (and the input delta for a single task model)."""
        out = output.tensors[name]
        merged = out.double() - self._weights(self.base)[name].double()
        models = self.task_models
        single = self.delta(models[0], name).double() if len(models) == 1 else None
        atol = 4 * torch.finfo(out.dtype).eps * float(out.double().abs().max())
        return Sample(merged, single, atol)
