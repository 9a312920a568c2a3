"""mergekit's ``slices:`` as a list of ordinary merges, one per slice.

A slice stacks ``length`` output blocks; each of its sources gives that many blocks
(``layer_range: [a, b]``, b excluded). Slice ``i`` is merged like a ``models:`` recipe whose
models are its sources except the base (a source that is the slice's ``base_model``, else the
recipe's, is the base when the method gives the base a role), with the slice's ``parameters``
between the sources' and the recipe's. Output blocks are numbered on from one slice to the next;
the embeddings come from the first slice's models and the final norm and head from the last
slice's (mergekit's rule). This module only validates and lays the slices out: which tensor is
read from where is ``plan.plan_slice``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..errors import RecipeError
from ..registry import METHODS, MergeMethod
from .job import Scope, base_is_special, check_listed_base, resolve_job
from .values import Block


class SourceView(Protocol):
    model: str
    layer_range: tuple[int, int]
    parameters: Block


class SliceView(Protocol):
    sources: Sequence[SourceView]
    base_model: str | None
    parameters: Block


@dataclass(frozen=True)
class SliceModel:
    """A slice source seen as a ``models:`` entry (what ``resolve_job`` reads)."""

    model: str
    parameters: Block
    sparsify: Block | None = None
    calibration: object | None = None
    features: str | None = None

    @property
    def task_name(self) -> str:
        return os.path.basename(os.path.normpath(self.model))


@dataclass(frozen=True)
class SliceRecipe:
    """One slice as a ``models:`` recipe: what the engine reads of a recipe."""

    merge_method: str
    base_model: str | None
    models: list[SliceModel]
    parameters: Block
    sparsify: Block | None
    dtype: str
    out_dtype: str | None
    seed: int
    name: str | None = None

    @property
    def method(self) -> MergeMethod:
        return METHODS.get(self.merge_method)


@dataclass(frozen=True)
class SliceSpec:
    """Slice ``index``: its recipe, its own parameters, where its models are written, the
    block ranges they read, and the output blocks it fills."""

    index: int
    recipe: SliceRecipe
    scope: Scope
    labels: list[str]
    ranges: list[tuple[int, int]]  # per model
    base_range: tuple[int, int] | None
    out_start: int
    length: int
    first: bool = False
    last: bool = False
    sources: list[str] = field(default_factory=list)  # every source path, in recipe order


def same_model(a: str, b: str | None) -> bool:
    """Two paths as written name one model (mergekit compares the references as given)."""
    return b is not None and os.path.normpath(os.path.expanduser(a)) == \
        os.path.normpath(os.path.expanduser(b))


def _refuse_method(method: MergeMethod) -> None:
    if method.task_specific or method.features:
        raise RecipeError(f"merge_method {method.name} merges whole models (per-task masks or "
                          "calibration features per model); use models:, not slices:")


def slice_specs(recipe: Any) -> list[SliceSpec]:
    """Every slice of a ``slices:`` recipe, validated like a ``models:`` recipe (no file is
    read): equal block counts per slice, the base among the sources where it has a role."""
    try:
        method = METHODS.get(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"merge_method: {exc}") from None
    _refuse_method(method)
    specs, start = [], 0
    for i, sl in enumerate(recipe.slices):
        where = f"slices.{i}"
        lengths = sorted({b - a for a, b in (s.layer_range for s in sl.sources)})
        if len(lengths) > 1:
            raise RecipeError(f"{where}.sources: every source must give the same number of "
                              f"layers (as mergekit); got {lengths}")
        base = sl.base_model or recipe.base_model
        role = base is not None and base_is_special(method)
        base_at = [j for j, s in enumerate(sl.sources) if role and same_model(s.model, base)]
        if role and not base_at:
            raise RecipeError(f"{where}: base_model '{base}' is not one of the slice's sources; "
                              "list it with its layer_range (merge_method "
                              f"{method.name} takes task vectors from it)")
        keep = [j for j in range(len(sl.sources)) if j not in base_at]
        if role:
            check_listed_base(method, True, len(keep))
        sub = SliceRecipe(recipe.merge_method, base if role else None,
                          [SliceModel(sl.sources[j].model, sl.sources[j].parameters)
                           for j in keep], recipe.parameters, recipe.sparsify, recipe.dtype,
                          recipe.out_dtype, recipe.seed)
        labels = [f"{where}.sources.{j}" for j in keep]
        scope: Scope = (f"{where}.parameters", sl.parameters)
        try:
            resolve_job(sub, scope, labels)
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        length = lengths[0]
        specs.append(SliceSpec(i, sub, scope, labels, [sl.sources[j].layer_range for j in keep],
                               sl.sources[base_at[0]].layer_range if base_at else None, start,
                               length, sources=[s.model for s in sl.sources]))
        start += length
    specs[0] = replace(specs[0], first=True)
    specs[-1] = replace(specs[-1], last=True)
    return specs
