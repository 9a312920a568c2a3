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
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

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


def _matcher(entry: FilterValue) -> Matcher | None:
    """None matches every tensor."""
    if entry.glob is not None:
        if entry.glob == "*":
            return None
        return re.compile(fnmatch.translate(entry.glob)).match  # type: ignore[return-value]
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
        return f"{self.where} ({self.pattern!r})"


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


def compile_value(value: ParamValue, spec: Param | None = None, where: str = "") -> Value:
    """``value`` as given at ``where`` for parameter ``spec`` (None: no gradients)."""
    gradient = spec.kind if spec is not None and spec.kind is not list else None
    entries = as_filter_list(value)
    if entries is None:
        return Value(constant=value, gradient=gradient)
    rules = tuple(Rule(_matcher(e), e.value, f"{where}[{i}]",
                       e.glob if e.glob is not None else str(e.filter))
                  for i, e in enumerate(entries))
    return Value(rules=rules, gradient=gradient)


def resolve(value: ParamValue | None, tensor_name: str, t: float = 0.0) -> Scalar | None:
    """The value that applies to ``tensor_name``: scalars apply everywhere; first filter match;
    None when no entry matches (the caller falls back)."""
    if value is None:
        return None
    return compile_value(value).at(tensor_name, t)
