"""Every parameter rule in one place: value types, filter lists, validation and resolution.

A recipe's parameters are checked once against the plug-ins' declared ``Param``s and compiled
into one typed ``JobParams`` (``resolve_job``); the engine then asks it one question per tensor
(``method_params``, ``weights``, ``model_values``, each model's ``step.params``). Values:

- a scalar (or a list, for list-typed parameters) applies to every tensor;
- a list of ``{filter: GLOB, value: X}`` entries is matched against the tensor name with
  shell-style globs (``*`` crosses dots, case-sensitive); the first match wins and an entry
  without ``filter`` matches everything. A per-model value that matches nothing falls back to
  the method-wide value, then to the parameter's default.

Precedence: a model's ``parameters`` over the recipe's ``parameters`` over the declared default
(with the method's own defaults for its built-in sparsification step). A ``sparsify:`` block
(per model, else method-wide; a per-model block of the same sparsifier inherits the
method-wide block's keys) replaces the method's own trim step and takes its parameters from the
block only.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from .errors import RecipeError, did_you_mean
from .registry import METHODS, SPARSIFIERS, MergeMethod, Param, Scalar, Sparsifier
from .statspass import StatsPass

ListValue = list[float] | list[str]


class FilterValue(BaseModel):
    """One entry of a filter list: ``value`` applies to tensors whose name matches ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: bool | int | float | str | ListValue


ParamValue = bool | int | float | str | list[FilterValue] | ListValue
Block = Mapping[str, ParamValue]


class ModelView(Protocol):
    """What the parameter rules read of a recipe's model entry (``recipe.ModelEntry``)."""

    parameters: Block
    sparsify: Block | None
    calibration: object | None
    features: str | None

    @property
    def task_name(self) -> str: ...


class Recipe(Protocol):
    """What the parameter rules read of a recipe (``recipe.Recipe``, which imports this
    module for its value types)."""

    merge_method: str
    base_model: str | None
    parameters: Block
    sparsify: Block | None

    @property
    def models(self) -> Sequence[ModelView]: ...

    @property
    def method(self) -> MergeMethod: ...


def is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], FilterValue)


def resolve(value: ParamValue | None, tensor_name: str) -> Scalar | None:
    """The value that applies to ``tensor_name``: scalars apply everywhere; first filter match;
    None when no entry matches (the caller falls back)."""
    if value is None or not is_filter_list(value):
        return value
    return _compile(value).at(tensor_name)


# --- compiled values ----------------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """A parameter value as given in one place of the recipe, compiled once: a constant, or
    filter rules (regex of the glob, or None for a catch-all) tried in order."""

    constant: Any = None
    rules: tuple[tuple[re.Pattern[str] | None, Any], ...] | None = None

    def at(self, tensor_name: str) -> Any:
        if self.rules is None:
            return self.constant
        for pattern, value in self.rules:
            if pattern is None or pattern.match(tensor_name):
                return value
        return None


def _compile(value: ParamValue) -> Value:
    if not is_filter_list(value):
        return Value(constant=value)
    rules = tuple((None if e.filter is None or e.filter == "*"
                   else re.compile(fnmatch.translate(e.filter)), e.value)
                  for e in value)  # type: ignore[union-attr]
    return Value(rules=rules)


@dataclass(frozen=True)
class Setting:
    """One parameter of one plug-in in a job: the places it may be given, in precedence order;
    the first that applies to a tensor wins, else the declared default."""

    spec: Param
    sources: tuple[Value, ...] = ()

    def at(self, tensor_name: str) -> Any:
        for source in self.sources:
            value = source.at(tensor_name)
            if value is not None:
                return value
        return self.spec.default


def _setting(spec: Param, *places: Mapping[str, ParamValue] | None) -> Setting:
    return Setting(spec, tuple(_compile(p[spec.name]) for p in places
                               if p is not None and spec.name in p))


@dataclass(frozen=True)
class SparsifyStep:
    """A model's sparsification: its sparsifier and resolved parameters. ``from_block``: a
    ``sparsify:`` block replaced the method's own trim step."""

    sparsifier: Sparsifier
    settings: tuple[Setting, ...]
    from_block: bool

    def params(self, tensor_name: str) -> dict[str, Any]:
        return {s.spec.python_name: s.at(tensor_name) for s in self.settings}

    def stats_pass(self, first_tensor: str) -> StatsPass | None:
        """The sparsifier's stats pass for this model (None when it needs none); its
        configuration is read at the first merged tensor (model-wide settings)."""
        if self.sparsifier.stats is None:
            return None
        return self.sparsifier.stats(**self.params(first_tensor))


@dataclass(frozen=True)
class ModelParams:
    """One model's resolved per-model parameters (the method's ``model_params``, by python
    name) and its sparsification step."""

    index: int
    task: str
    settings: dict[str, Setting]
    step: SparsifyStep | None


@dataclass(frozen=True)
class JobParams:
    """Every parameter of a merge, resolved: the engine's one source of parameter values."""

    method: MergeMethod
    settings: tuple[Setting, ...]
    models: tuple[ModelParams, ...]
    base_first: bool  # the base is prepended as the first end point (slerp-like, one model)

    def method_params(self, tensor_name: str) -> dict[str, Any]:
        return {s.spec.python_name: s.at(tensor_name) for s in self.settings}

    def weights(self, tensor_name: str) -> list[float]:
        """One weight per input of the method: per model, and 1 for a prepended base."""
        ws = [float(m.settings["weight"].at(tensor_name)) if "weight" in m.settings else 1.0
              for m in self.models]
        return ([1.0] if self.base_first else []) + ws

    def model_values(self, tensor_name: str) -> dict[str, list[Any]]:
        """The method's other per-model parameters (not ``weight``), one value per input (the
        declared default for a prepended base): passed to the method as lists."""
        out: dict[str, list[Any]] = {}
        for p in self.method.model_params:
            if p.name == "weight":
                continue
            values = [m.settings[p.python_name].at(tensor_name) for m in self.models]
            out[p.python_name] = ([p.default] if self.base_first else []) + values
        return out


def base_is_first_input(method: MergeMethod, has_base: bool, n_models: int) -> bool:
    """The one rule for two-model weight-space methods (slerp) given a base and one model: the
    base is the first end point and the model the second. Not for a method that reads the base
    itself (``uses_base``: nuslerp's two models are task vectors from it)."""
    return (method.space == "weight" and method.max_models == 2 and not method.uses_base
            and has_base and n_models == 1)


# --- the schema of one model's sparsify step -----------------------------------------------

def step_specs(method: MergeMethod, sparsifier: Sparsifier, from_block: bool) -> dict[str, Param]:
    """The sparsifier's params, with the method's own defaults when it is the default step
    (``sparsifier_defaults``) or the defaults a block gets under this method (``block_defaults``)."""
    specs = {}
    overrides = method.block_defaults if from_block else method.sparsifier_defaults
    for p in sparsifier.params:
        if p.name in overrides:
            p = Param(**{**p.__dict__, "default": overrides[p.name]})
        specs[p.name] = p
    return specs


def _named_sparsifier(block: Mapping[str, Any], where: str) -> Sparsifier:
    name = block.get("method")
    if not isinstance(name, str):
        raise RecipeError("a sparsify block needs 'method: NAME' (e.g. method: magnitude)")
    try:
        return SPARSIFIERS.get(name)
    except RecipeError as exc:
        raise RecipeError(f"{where}.method: {exc}") from None


def _block_settings(sparsifier: Sparsifier, specs: dict[str, Param],
                    block_params: Mapping[str, ParamValue], where: str) -> tuple[Setting, ...]:
    """Check a block's keys and values against ``specs``; its settings (block, else default)."""
    for key, value in block_params.items():
        if key not in specs:
            raise RecipeError(f"{where}: unknown parameter '{key}' for sparsifier "
                              f"{sparsifier.name}{did_you_mean(key, specs)}; known: "
                              f"{', '.join(specs) or 'none'}")
        _check_value(specs[key], value, where)
    return tuple(_setting(p, block_params) for p in specs.values())


def sparsify_step(block: Mapping[str, Any], where: str = "sparsify") -> SparsifyStep:
    """A validated ``sparsify:`` block used on its own, outside a merge (``mergewise inspect``):
    ``{"method": NAME, **params}`` with every value checked."""
    sparsifier = _named_sparsifier(block, where)
    params = {k: v for k, v in block.items() if k != "method"}
    specs = {p.name: p for p in sparsifier.params}
    return SparsifyStep(sparsifier, _block_settings(sparsifier, specs, params, where), True)


def _block_of(recipe: Recipe, i: int) -> tuple[Sparsifier | None, dict[str, ParamValue], bool]:
    """Model i's sparsifier: (sparsifier, its explicit params, from_block)."""
    method = recipe.method
    own = recipe.models[i].sparsify
    block = own or recipe.sparsify
    if block is None:
        if method.sparsifier is None:
            return None, {}, False
        return SPARSIFIERS.get(method.sparsifier), {}, False
    sparsifier = _named_sparsifier(block, f"models.{i}.sparsify" if own else "sparsify")
    params = {k: v for k, v in block.items() if k != "method"}
    global_block = recipe.sparsify or {}
    if own is not None and global_block.get("method") == sparsifier.name:
        params = {**{k: v for k, v in global_block.items() if k != "method"}, **params}
    return sparsifier, params, True


# --- validation + resolution ---------------------------------------------------------------

def _check_value(param: Param, value: ParamValue, where: str) -> None:
    if is_filter_list(value):
        for i, entry in enumerate(value):  # type: ignore[arg-type]
            param.check(entry.value, f"{where}.{param.name}[{i}]")
    else:
        param.check(value, where)


def _check_models(recipe: Recipe, method: MergeMethod) -> None:
    """Model count, unique task names, base, features and sparsify acceptance."""
    n = len(recipe.models)
    if base_is_first_input(method, bool(recipe.base_model), n):
        n = 2
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                else f"at least {method.min_models}")
        raise RecipeError(f"merge_method {method.name} needs {want} models, the recipe has {n}")
    if method.task_specific:
        seen: dict[str, int] = {}
        for i, entry in enumerate(recipe.models):
            if entry.task_name in seen:
                raise RecipeError(
                    f"models.{i}: task name '{entry.task_name}' is also models.{seen[entry.task_name]}'s;"
                    f" {method.name} keeps one model per task, so give each model a unique 'name'")
            seen[entry.task_name] = i
    if method.requires_base and not recipe.base_model:
        raise RecipeError(f"merge_method {method.name} needs base_model (task vectors are "
                          "fine-tuned minus base weights)")
    if method.features:
        lacking = [f"models.{i} ({m.task_name})" for i, m in enumerate(recipe.models)
                   if m.calibration is None and m.features is None]
        if lacking:
            raise RecipeError(f"merge_method {method.name} needs calibration features of every "
                              f"model; {', '.join(lacking)} has neither a 'calibration:' block "
                              "nor a 'features:' stats file")
    if not method.accepts_sparsify and (recipe.sparsify or any(m.sparsify for m in recipe.models)):
        raise RecipeError(f"merge_method {method.name} works on full weights and takes no "
                          "sparsify block")


def _model_specs(recipe: Recipe, method: MergeMethod, i: int
                 ) -> tuple[dict[str, Param], SparsifyStep | None]:
    """Model i's per-model parameter specs (weight, and a default step's params), and its
    sparsify step, checking a block's keys and values."""
    specs = {p.name: p for p in method.model_params}
    sp, block_params, from_block = _block_of(recipe, i)
    if sp is None:
        return specs, None
    sp_specs = step_specs(method, sp, from_block)
    where = f"models.{i}.sparsify" if recipe.models[i].sparsify else "sparsify"
    if from_block:
        settings = _block_settings(sp, sp_specs, block_params, where)
    else:
        specs.update(sp_specs)
        settings = tuple(_setting(p, recipe.models[i].parameters, recipe.parameters)
                         for p in sp_specs.values())
    return specs, SparsifyStep(sp, settings, from_block)


def _unknown_key_message(key: str, where: str, method: MergeMethod, method_specs: dict,
                         model_keys: set[str], recipe: Recipe) -> str:
    known = sorted(set(method_specs) | model_keys)
    extra = ""
    if key == "density" and (recipe.sparsify or any(m.sparsify for m in recipe.models)):
        extra = " (a sparsify block replaces the method's own trim: put density in that block)"
    return (f"{where}: unknown parameter '{key}' for {method.name}{did_you_mean(key, known)}"
            f"{extra}; known: {', '.join(known) or 'none'}")


def _check_keys(recipe: Recipe, method: MergeMethod, per_model: list[dict[str, Param]]) -> None:
    """Every key of the method-wide and per-model ``parameters`` is known, typed and in range."""
    method_specs = {p.name: p for p in method.params}
    all_model_keys = set().union(*per_model) if per_model else set()
    for key, value in recipe.parameters.items():
        if key in method_specs:
            _check_value(method_specs[key], value, "parameters")
        elif key in all_model_keys:
            for specs in per_model:
                if key in specs:
                    _check_value(specs[key], value, "parameters")
        else:
            raise RecipeError(_unknown_key_message(key, "parameters", method, method_specs,
                                                   all_model_keys, recipe))
    for i, entry in enumerate(recipe.models):
        for key, value in entry.parameters.items():
            where = f"models.{i}.parameters"
            if key in per_model[i]:
                _check_value(per_model[i][key], value, where)
            elif key in method_specs:
                raise RecipeError(f"{where}: '{key}' is method-wide; move it to the top-level "
                                  "parameters")
            else:
                raise RecipeError(_unknown_key_message(key, where, method, method_specs,
                                                       set(per_model[i]), recipe))


def _check_required(recipe: Recipe, method: MergeMethod, per_model: list[dict[str, Param]]
                    ) -> None:
    """A required parameter must be given: method-wide ones in ``parameters``, per-model ones
    there or in every model's own ``parameters``."""
    for p in method.params:
        if p.required and p.name not in recipe.parameters:
            raise RecipeError(f"parameters: merge_method {method.name} needs '{p.name}' "
                              f"({p.help})")
    for i, (entry, specs) in enumerate(zip(recipe.models, per_model, strict=True)):
        for p in specs.values():
            if p.required and p.name not in entry.parameters and p.name not in recipe.parameters:
                raise RecipeError(f"models.{i}.parameters: merge_method {method.name} needs "
                                  f"'{p.name}' for every model ({p.help}); give it per model "
                                  "or in the top-level parameters")


def _check_global_scope(recipe: Recipe) -> None:
    places: Sequence[Mapping[str, Any]] = [
        recipe.parameters, *(m.parameters for m in recipe.models), recipe.sparsify or {},
        *((m.sparsify or {}) for m in recipe.models)]
    if any(isinstance(p.get("scope"), str) and p["scope"] == "global" for p in places):
        for src in [recipe.parameters, *(m.parameters for m in recipe.models)]:
            if is_filter_list(src.get("density")):
                raise RecipeError("scope: global needs one density per model, not a filter list")


def resolve_job(recipe: Recipe) -> JobParams:
    """Check every key, type and range of every parameter (raising a one-line RecipeError on
    the first problem) and compile them into the job's ``JobParams``."""
    try:
        method = METHODS.get(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"merge_method: {exc}") from None
    _check_models(recipe, method)
    per_model, steps = [], []
    for i in range(len(recipe.models)):
        specs, step = _model_specs(recipe, method, i)
        per_model.append(specs)
        steps.append(step)
    _check_keys(recipe, method, per_model)
    _check_required(recipe, method, per_model)
    _check_global_scope(recipe)
    models = tuple(
        ModelParams(i, entry.task_name,
                    {p.python_name: _setting(p, entry.parameters, recipe.parameters)
                     for p in method.model_params}, steps[i])
        for i, entry in enumerate(recipe.models))
    return JobParams(method=method,
                     settings=tuple(_setting(p, recipe.parameters) for p in method.params),
                     models=models,
                     base_first=base_is_first_input(method, bool(recipe.base_model),
                                                    len(recipe.models)))
