"""mergewise: merge fine-tuned models of one pretrained base, tensor by tensor.

Public API: ``merge`` (recipe -> checkpoint directory), ``merge_state_dicts`` (in memory),
``load_recipe``, and the plug-in registries ``METHODS`` and ``SPARSIFIERS``. Task-specific
methods (EMR): ``merge_task_state_dicts`` (in memory), ``materialize`` / ``task_state_dict`` /
``load_task`` (from a merge's output directory).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    CheckpointError,
    FeatureError,
    MergewiseError,
    ModulatorError,
    NonFiniteError,
    OutputError,
    RecipeError,
    ShapeMismatchError,
    UnknownTaskError,
)
from .registry import METHODS, SPARSIFIERS
from .version import __version__

# The rest of the API loads on first use (PEP 562): importing mergewise, and `mergewise --help`,
# do not pay for torch.
_LAZY = {
    "MergeResult": "api", "merge": "api", "merge_state_dicts": "api",
    "merge_task_state_dicts": "api", "TaskModels": "task_models", "load_task": "task_models",
    "materialize": "task_models", "task_state_dict": "task_models", "Recipe": "recipe",
    "load_recipe": "recipe", "parse_recipe": "recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergewise' has no attribute {name!r}")


__all__ = [
    "METHODS", "SPARSIFIERS", "CheckpointError", "FeatureError", "MergeResult", "MergewiseError",
    "ModulatorError", "NonFiniteError", "OutputError", "Recipe", "RecipeError",
    "ShapeMismatchError", "TaskModels", "UnknownTaskError", "__version__", "load_recipe",
    "load_task", "materialize", "merge", "merge_state_dicts", "merge_task_state_dicts",
    "parse_recipe", "task_state_dict",
]
