"""What a parameter value means at one tensor: scalars, gradients, filter lists (mergekit's
language), compiled once per job.

- A scalar applies to every tensor.
- A list of scalars, for a parameter that is not list-typed, is a **gradient**: anchor points
  spread evenly over the layers; a tensor of the layer at position t in [0, 1] (layer i of L:
  t = i / (L - 1); a one-layer stack t = 1; embeddings, final norm and head t = 0) gets
  (1 - f) v[i0] + f v[i0 + 1] with i0 = int(t (n - 1)), f = t (n - 1) - i0, computed in float64 as
  mergekit does; bool/str/int gradients take v[int(t (n - 1))].
- A list of ``{filter: TEXT, value: X}`` entries (or a single one) is tried in order; the first
  entry whose ``filter`` is a substring of the tensor name (mergekit's rule; ``"*"`` or no
  filter matches everything) gives the value, which may itself be a gradient.
  ``{glob: PATTERN, value: X}`` matches shell-style instead (``*`` crosses dots,
  case-sensitive): mergewise's opt-in syntax. A list where nothing matches falls through to
  the next place the parameter is given, then to its default.
- Every entry must match at least one tensor of the merge (``Value.unmatched``), so a typo is
  an error naming the entry, not a silently different merge.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from ..errors import RecipeError, short_repr
from ..registry import Param, Scalar

ListValue = list[float] | list[str]


class FilterValue(BaseModel):
    """One entry of a filter list: ``value`` applies to tensors whose name contains ``filter``
    (or matches the shell pattern ``glob``)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    glob: str | None = None
    value: bool | int | float | str | ListValue

    @model_validator(mode="after")
    def _one_pattern(self) -> FilterValue:
        if self.filter is not None and self.glob is not None:
            raise ValueError("give 'filter' (a substring, as mergekit) or 'glob' (a shell "
                             "pattern), not both")
        return self


ParamValue = bool | int | float | str | FilterValue | list[FilterValue] | ListValue
Block = Mapping[str, ParamValue]


def as_filter_list(value: Any) -> list[FilterValue] | None:
    """The entries of a filter list (a single ``{filter, value}`` counts as one), else None."""
    if isinstance(value, FilterValue):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        return value
    return None


def is_gradient(spec: Param, value: Any) -> bool:
    """A list given to a parameter that is not list-typed is a gradient over layer depth."""
    return spec.kind is not list and isinstance(value, list)


def gradient_at(values: list[Any], t: float, kind: type = float) -> Any:
    """mergekit's interpolation of gradient anchors at layer position ``t`` (a step function
    for int, bool and str parameters)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    if kind is not float:
        return kind(values[i0])
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


Matcher = Callable[[str], bool]

# Filter entries in one recipe, all places together: each is tried against every tensor name
# (first match, and the check that it matches some tensor), so the work is tensors x entries.
MAX_FILTERS = 10_000


@functools.lru_cache(maxsize=MAX_FILTERS)
def _glob(pattern: str) -> Matcher:
    """A glob compiled once, however many jobs (slices, models) use it: ``re``'s own cache
    holds 512 patterns and thrashes past that."""
    return re.compile(fnmatch.translate(pattern)).match  # type: ignore[return-value]


def _matcher(entry: FilterValue) -> Matcher | None:
    """None matches every tensor."""
    if entry.glob is not None:
        if entry.glob == "*":
            return None
        return _glob(entry.glob)
    if entry.filter is None or entry.filter == "*":
        return None
    text = entry.filter
    return lambda name: text in name


@dataclass(frozen=True)
class Rule:
    """One filter-list entry, compiled: its matcher (None: every tensor), value, and where the
    recipe gives it (for errors)."""

    match: Matcher | None
    value: Any
    where: str
    pattern: str

    @property
    def label(self) -> str:
        return f"{self.where} ({short_repr(self.pattern)})"


@dataclass(frozen=True)
class Value:
    """A parameter value as given in one place of the recipe, compiled once: a constant, or
    filter rules tried in order; ``gradient`` when list values are anchors over layer depth."""

    constant: Any = None
    rules: tuple[Rule, ...] | None = None
    gradient: type | None = None  # the parameter's kind when list values are gradients

    def at(self, tensor_name: str, t: float = 0.0) -> Any:
        value = self.constant
        if self.rules is not None:
            value = next((r.value for r in self.rules
                          if r.match is None or r.match(tensor_name)), None)
        if self.gradient is not None and isinstance(value, list):
            return gradient_at(value, t, self.gradient)
        return value

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The entries whose pattern matches none of ``names`` (as ``where ('pattern')``)."""
        names = list(names)
        return [r.label for r in self.rules or ()
                if r.match is not None and not any(r.match(n) for n in names)]

    def labels(self) -> list[str]:
        return [r.label for r in self.rules or () if r.match is not None]


def _typed(value: Any, spec: Param | None, where: str) -> Any:
    """The value as the parameter's type (``2.0`` for an int is 2, ``1`` for a float 1.0), so
    a method never sees another type than it declared."""
    if spec is None:
        return value
    if is_gradient(spec, value):
        return [spec.check(v, where) for v in value]
    return spec.check(value, where)


def compile_value(value: ParamValue, spec: Param | None = None, where: str = "") -> Value:
    """``value`` as given at ``where`` for parameter ``spec`` (None: no gradients)."""
    gradient = spec.kind if spec is not None and spec.kind is not list else None
    entries = as_filter_list(value)
    if entries is None:
        return Value(constant=_typed(value, spec, where), gradient=gradient)
    rules = tuple(Rule(_matcher(e), _typed(e.value, spec, f"{where}[{i}]"), f"{where}[{i}]",
                       e.glob if e.glob is not None else str(e.filter))
                  for i, e in enumerate(entries))
    return Value(rules=rules, gradient=gradient)


def check_filter_total(blocks: Iterable[Block | None], source: str = "recipe") -> None:
    """At most MAX_FILTERS filter entries in a recipe (every ``parameters`` and ``sparsify``
    block), so matching them against a model's tensors stays a matter of seconds."""
    total = sum(len(entries) for block in blocks for value in (block or {}).values()
                if (entries := as_filter_list(value)) is not None)
    if total > MAX_FILTERS:
        raise RecipeError(f"{source}: {total} filter entries in all; at most {MAX_FILTERS} "
                          "(merge fewer, broader patterns)")


def resolve(value: ParamValue | None, tensor_name: str, t: float = 0.0) -> Scalar | None:
    """The value that applies to ``tensor_name``: scalars apply everywhere; first filter match;
    None when no entry matches (the caller falls back)."""
    if value is None:
        return None
    return compile_value(value).at(tensor_name, t)
