"""mergewise: merge fine-tuned models of one pretrained base, tensor by tensor.

Public API: ``merge`` (recipe -> checkpoint directory), ``merge_state_dicts`` (in memory),
``load_recipe``, and the plug-in registries ``METHODS`` and ``SPARSIFIERS``. Task-specific
methods (EMR): ``merge_task_state_dicts`` (in memory), ``materialize`` / ``task_state_dict`` /
``load_task`` (from a merge's output directory).
"""

from __future__ import annotations

from . import methods as _methods  # noqa: E402,F401  (fills METHODS)
from . import sparsify as _sparsify  # noqa: E402,F401  (fills SPARSIFIERS)
from .api import MergeResult, merge, merge_state_dicts, merge_task_state_dicts  # noqa: E402
from .errors import (  # noqa: E402
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
from .materialize import TaskModels, load_task, materialize, task_state_dict  # noqa: E402
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from .registry import METHODS, SPARSIFIERS  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "METHODS", "SPARSIFIERS", "CheckpointError", "FeatureError", "MergeResult", "MergewiseError",
    "ModulatorError", "NonFiniteError", "OutputError", "Recipe", "RecipeError",
    "ShapeMismatchError", "TaskModels", "UnknownTaskError", "__version__", "load_recipe",
    "load_task", "materialize", "merge", "merge_state_dicts", "merge_task_state_dicts",
    "parse_recipe", "task_state_dict",
]
