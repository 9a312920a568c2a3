"""One registry per kind of plug-in (merge methods, sparsifiers) and the typed parameters they take.

A plug-in declares its parameters once (name, default, type, range, help); recipe validation,
``mergewise methods`` and the docs are all derived from that declaration.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from .errors import RecipeError, did_you_mean, short_repr

Scalar = float | int | bool | str


# Bounds of every number and list a user gives, whatever the parameter (its declared range
# comes on top): ints fit 32 bits (counts, iterations, indices), lists (gradient anchors,
# filter entries, list values) stay short enough to be checked against every tensor quickly.
INT_LIMIT = 2**31 - 1
MAX_LIST_ITEMS = 1024
_TYPE_TEXT = {float: "a float (a finite number)", int: "an int", bool: "a bool (true or false)",
              str: "a string"}


def _got(value: Any) -> str:
    """What the user gave, with the fix for the usual mistakes (a quoted number, a boolean)."""
    shown = short_repr(value)
    if isinstance(value, bool):
        return f"{shown} (a boolean)"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return shown
        return f"{shown} (a quoted string: write the number without quotes)"
    return shown


def as_kind(value: Any, kind: type, limit: int = INT_LIMIT) -> Any:
    """``value`` as a ``kind`` (float, int, bool, str) or ValueError("must be ..., got ...").

    The one type rule of user values: a float takes an int or a float, finite; an int takes an
    int or a float with no fraction (``1e3``, as pydantic and mergekit do), within +-``limit``;
    a bool only true/false (mergekit would read ``1`` or ``"yes"``; refused, not guessed); a
    string only a string. A boolean is never a number.
    """
    if isinstance(value, kind) and kind in (bool, str):
        return value
    if kind in (float, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is float or isinstance(value, float):
            number = _finite(value)
            if kind is float:
                return number
            if number.is_integer():
                value = int(number)
        if isinstance(value, int):
            if abs(value) > limit:
                raise ValueError(f"must lie in [-{limit}, {limit}] (an int), got "
                                 f"{short_repr(value)}")
            return value
    raise ValueError(f"must be {_TYPE_TEXT.get(kind, kind.__name__)}, got {_got(value)}")


def _finite(value: int | float) -> float:
    """``value`` as a finite float (an int past the float range counts as infinite)."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {short_repr(value)}")
    return number


def as_list(value: Any, item: type) -> list[Any]:
    """A list-typed parameter's value: a list of at most MAX_LIST_ITEMS ``item``s."""
    if not isinstance(value, (list, tuple)) or isinstance(value, str):
        raise ValueError(f"must be a list of {item.__name__}, got {_got(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise ValueError(f"has {len(value)} items; at most {MAX_LIST_ITEMS}")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(as_kind(v, item))
        except ValueError as exc:
            raise ValueError(f"item {i} {exc}") from None
    return out


@dataclass(frozen=True)
class Param:
    """A typed parameter: ``kind`` is float, int, bool or str; bounds are checked at recipe load."""

    name: str
    default: Any
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    arg: str | None = None  # python keyword when ``name`` is a keyword (``lambda``)
    # For kind=list: the item type, and an extra check of the whole value (returns an error text)
    item_kind: type | None = None
    validate: Callable[[Any], str | None] | None = None
    # required: no default; a recipe must give it (method-wide, or for every model); ``default``
    # is then only what the docs show (None)
    required: bool = False

    @property
    def python_name(self) -> str:
        return self.arg or self.name

    def check(self, value: Any, where: str) -> Scalar:
        """Return ``value`` coerced to this parameter's type, or raise a one-line RecipeError
        (NaN and Inf are refused: a NaN passes every ``x < low`` test)."""
        try:
            if self.kind is list:
                value = as_list(value, self.item_kind or str)
            else:
                value = as_kind(value, self.kind)
        except ValueError as exc:
            bounds = f"{self.range_text()}; " if self.low is not None or self.high is not None else ""
            raise RecipeError(f"{where}: '{self.name}' {exc}; {bounds}{self.help}") from None
        shown = short_repr(value)
        if self.validate is not None:
            problem = self.validate(value)
            if problem:
                raise RecipeError(f"{where}: '{self.name}' = {shown}: {problem}")
        if self.choices is not None and value not in self.choices:
            raise RecipeError(
                f"{where}: '{self.name}' must be one of {', '.join(self.choices)}, got {shown}"
            )
        if (self.low is not None and (value < self.low or (self.low_open and value == self.low))) \
                or (self.high is not None
                    and (value > self.high or (self.high_open and value == self.high))):
            raise RecipeError(f"{where}: '{self.name}' = {shown} is out of range; "
                              f"{self.range_text()}")
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"it must lie in {left}{lo}, {hi}{right}"

    def type_text(self, sep: str = "|") -> str:
        """'float in (0, 1]', 'mean|sum', 'list of float': the type as users read it."""
        if self.choices:
            return sep.join(self.choices)
        if self.kind is list:
            return f"list of {(self.item_kind or str).__name__}"
        kind = self.kind.__name__
        if self.low is not None or self.high is not None:
            kind += " in " + self.range_text().removeprefix("it must lie in ")
        return kind

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name} ({self.type_text()}, {default}): {self.help}"


# Shared parameter declarations, so every method spells them the same way.
WEIGHT = Param("weight", 1.0, float, "per-model factor on its task vector (or weights, for linear)")
LAMBDA = Param("lambda", 1.0, float, "scale of the merged task vector: base + lambda * tau",
               arg="lam")
INT8_MASK = Param("int8_mask", False, bool, "accepted for mergekit recipes; no effect here "
                  "(masks are bool, as mergekit's own are)")


def normalize_param(default: bool) -> Param:
    """mergekit's ``normalize`` of the task-arithmetic family, with that method's default."""
    return Param("normalize", default, bool, "divide the merged entries by the sum of the "
                 "weights of the models that contribute to them (mergekit)")

@dataclass(frozen=True)
class Sparsifier:
    """A pure function of one task-vector tensor returning a tensor of the same shape.

    ``func(delta, *, generator, stats, **params)``. ``generator`` is a CPU ``torch.Generator``
    seeded per (seed, model index, tensor name) when ``random`` is true. ``stats`` is what the
    sparsifier's stats pass computed for this (model, tensor), or None.
    """

    name: str
    func: Callable[..., Any]
    params: tuple[Param, ...]
    doc: str
    random: bool = False
    # True when ``func`` accepts ``info=dict`` and fills it with per-tensor diagnostics (report)
    reports: bool = False
    # Factory of a StatsPass (see statspass.py) when global information is needed; called with
    # the resolved per-model parameters; returns None when this configuration needs no stats.
    stats: Callable[..., Any] | None = None
    # True when ``func`` returns the task vector unchanged with these resolved parameters
    # (density 1): such a task vector need never exist whole (``chunked`` streams it)
    keeps_all: Callable[..., bool] | None = None
    # The chunked form, for a task vector that is never whole: ``streamed(n, sample_of,
    # generator=..., stats=..., **params)`` (``sample_of(step)`` gives |tau|[::step]; the
    # tensor's generator and stats-pass result, as ``func`` gets them) returns a step with
    # ``feed(part, |tau|)`` (chunks in order), ``ready(|tau|_at)`` and ``apply(tau, |tau|,
    # part)`` (``streamselect.BandStep``, ``random.RandomStep``, ``tadrop.TADropStep``), or
    # None when these parameters need the whole tensor
    streamed: Callable[..., Any] | None = None


@dataclass(frozen=True)
class MergeMethod:
    """A pure function of one tensor's base value and K inputs returning the merged tensor.

    ``func(base, tensors, weights, **params)``: ``tensors`` are task vectors (deltas) when
    ``space == "delta"`` (already sparsified), full weights when ``space == "weight"``;
    ``weights`` are the per-model ``weight`` values resolved for this tensor, and every other
    declared per-model parameter arrives as a keyword holding one value per input. ``base`` is
    the base tensor in the compute dtype for delta-space methods, and for weight-space methods
    that declare ``uses_base`` when the recipe has a base (else None).
    """

    name: str
    func: Callable[..., Any]
    space: Literal["delta", "weight"]
    params: tuple[Param, ...]
    doc: str
    sparsifier: str | None = None  # default sparsification step (its params become model params)
    sparsifier_defaults: dict[str, Any] = field(default_factory=dict)
    requires_base: bool = True
    # weight space only: the method reads the base tensor (model_stock, nuslerp with a base...)
    uses_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    model_params: tuple[Param, ...] = (WEIGHT,)
    accepts_sparsify: bool = True
    # Defaults a ``sparsify:`` block gets under this method when it has such a parameter
    # (the DARE methods make TADrop default to random selection).
    block_defaults: dict[str, Any] = field(default_factory=dict)
    # True when the method yields one model per task (EMR): ``func`` returns a
    # ``TaskSpecificOutput`` and the caller assembles a task's model from the unified tensor and
    # that task's modulators (``api.merge_task_state_dicts``, ``mergewise materialize``).
    task_specific: bool = False
    # True for data-aware methods (LOT, RegMean): ``func`` also takes ``features`` (one
    # ``features.TensorFeature`` or None per model) and ``name`` (the tensor's name)
    features: bool = False
    # True when the statistics depend on every expert jointly (RegMean++: block l captured on the
    # merged blocks < l): a merge captures them itself, never from or into ``features:`` files
    sequential_features: bool = False
    # What the statistics are: "inputs" (layer-input Grams and norm energies, features.statsfile:
    # LOT, RegMean) or "fisher" (per-parameter diagonal Fisher, features.fisherfile)
    feature_stats: Literal["inputs", "fisher"] = "inputs"
    # The optional calibration options (``recipe.CAPTURE_OPTIONS``: pack, accumulate...) the
    # method's capture honours; a calibration block giving any other one a value other than its
    # default is refused before any model is loaded (``features.sources.check_options``), never
    # silently ignored. ``calibration_why``: why the method cannot honour an option (the refusal)
    calibration_options: tuple[str, ...] = ()
    calibration_why: dict[str, str] = field(default_factory=dict)
    # True when ``func`` also takes ``name`` (the tensor's name), e.g. to tell a block's linear
    # weights from embeddings and heads (WUDI); data-aware methods get it anyway
    takes_name: bool = False
    # True when entry i of the result depends only on entry i of the base and the inputs (and
    # on the parameters): large CPU tensors are then merged chunk by chunk, in cache (chunked)
    elementwise: bool = False


@dataclass
class TaskSpecificOutput:
    """A task-specific method's result for one tensor: the unified weights (compute dtype) and
    the per-task modulators the method's collector stores (EMR: masks and |tau| means)."""

    merged: Any
    modulators: Any


T = TypeVar("T", MergeMethod, Sparsifier)


class Registry(Generic[T]):
    """Name -> plug-in; unknown names fail with a "did you mean" suggestion. The plug-in
    package (one module per plug-in, each registering itself) is imported on first use, so
    importing mergewise (or running ``mergewise --help``) does not import torch."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)
        return self._items

    def register(self, item: T) -> T:
        if item.name in self._items:
            raise ValueError(f"{self.kind} '{item.name}' is registered twice")
        self._items[item.name] = item
        return item

    def get(self, name: str) -> T:
        items = self._load()
        try:
            return items[name]
        except KeyError:
            raise RecipeError(
                # the name echoed short: the list of known names (~300 characters for the
                # methods) must fit the one-line bound of an error with it
                f"unknown {self.kind} {short_repr(name, 40)}{did_you_mean(name, items)}; known: "
                f"{', '.join(sorted(items))}") from None

    def names(self) -> list[str]:
        return sorted(self._load())

    def __iter__(self) -> Iterator[T]:
        return iter(self._items[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._load()


METHODS: Registry[MergeMethod] = Registry("merge method", "mergewise.methods")
SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier", "mergewise.sparsify")

