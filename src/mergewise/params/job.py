"""Parameter validation and resolution: a recipe's parameters checked once against the
plug-ins' declared ``Param``s and compiled into one typed ``JobParams`` (``resolve_job``); the
engine then asks it one question per tensor (``method_params``, ``weights``, ``model_values``,
each model's ``step.params``), with the tensor's name and its layer position t (gradients).
What a value means at a tensor (scalars, gradients, filter lists) is ``values.py``.

Precedence: a model's ``parameters`` over the recipe's ``parameters`` over the declared default
(with the method's own defaults for its built-in sparsification step); a per-model value whose
filter list matches nothing falls through to the next. Method-wide parameters given per model are
refused (mergekit ignores them silently). A ``sparsify:`` block (per model, else method-wide; a
per-model block of the same sparsifier inherits the method-wide block's keys) replaces the
method's own trim step and takes its parameters from the block only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..errors import RecipeError, did_you_mean, short_repr
from ..registry import MAX_LIST_ITEMS, METHODS, SPARSIFIERS, MergeMethod, Param, Sparsifier
from ..statspass import StatsPass
from .values import Block, ParamValue, Value, as_filter_list, compile_value, is_gradient


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


@dataclass(frozen=True)
class Setting:
    """One parameter of one plug-in in a job: the places it may be given, in precedence order;
    the first that applies to a tensor wins, else the declared default."""

    spec: Param
    sources: tuple[Value, ...] = ()

    def at(self, tensor_name: str, t: float = 0.0) -> Any:
        for source in self.sources:
            value = source.at(tensor_name, t)
            if value is not None:
                return value
        return self.spec.default

    def unmatched(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        return [u for source in self.sources for u in source.unmatched(names)]

    def labels(self) -> list[str]:
        return [label for source in self.sources for label in source.labels()]


Place = tuple[str, Block | None]  # (where in the recipe, its parameters)


def _setting(spec: Param, *places: Place) -> Setting:
    return Setting(spec, tuple(compile_value(block[spec.name], spec, f"{where}.{spec.name}")
                               for where, block in places
                               if block is not None and spec.name in block))


@dataclass(frozen=True)
class SparsifyStep:
    """A model's sparsification: its sparsifier and resolved parameters. ``from_block``: a
    ``sparsify:`` block replaced the method's own trim step."""

    sparsifier: Sparsifier
    settings: tuple[Setting, ...]
    from_block: bool

    def params(self, tensor_name: str, t: float = 0.0) -> dict[str, Any]:
        return {s.spec.python_name: s.at(tensor_name, t) for s in self.settings}

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

    def method_params(self, tensor_name: str, t: float = 0.0) -> dict[str, Any]:
        return {s.spec.python_name: s.at(tensor_name, t) for s in self.settings}

    def weights(self, names: Sequence[str], t: float = 0.0) -> list[float]:
        """One weight per input of the method: per model, at the tensor name that model reads
        (mergekit: per-model filters see the input name), and 1 for a prepended base."""
        ws = [float(m.settings["weight"].at(n, t)) if "weight" in m.settings else 1.0
              for m, n in zip(self.models, names, strict=True)]
        return ([1.0] if self.base_first else []) + ws

    def model_values(self, names: Sequence[str], t: float = 0.0) -> dict[str, list[Any]]:
        """The method's other per-model parameters (not ``weight``), one value per input (the
        declared default for a prepended base): passed to the method as lists."""
        out: dict[str, list[Any]] = {}
        for p in self.method.model_params:
            if p.name == "weight":
                continue
            values = [m.settings[p.python_name].at(n, t)
                      for m, n in zip(self.models, names, strict=True)]
            out[p.python_name] = ([p.default] if self.base_first else []) + values
        return out

    def _all_settings(self) -> list[Setting]:
        return [*self.settings, *(s for m in self.models for s in m.settings.values()),
                *(s for m in self.models if m.step for s in m.step.settings)]

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """Every filter entry of the recipe that matches none of ``names``."""
        names = list(names)
        return list(dict.fromkeys(u for s in self._all_settings() for u in s.unmatched(names)))

    def labels(self) -> list[str]:
        """Every filter entry of the recipe (``where ('pattern')``), catch-alls left out."""
        return list(dict.fromkeys(label for s in self._all_settings() for label in s.labels()))


def interpolates_from_base(method: MergeMethod) -> bool:
    """A two-model weight-space method whose base is its t = 0 end point (slerp); not one that
    reads the base itself (``uses_base``: nuslerp's two models are task vectors from it)."""
    return method.space == "weight" and method.max_models == 2 and not method.uses_base


def base_is_first_input(method: MergeMethod, has_base: bool, n_models: int) -> bool:
    """The one rule for such a method given a base and one model: the base is the first end
    point and the model the second."""
    return interpolates_from_base(method) and has_base and n_models == 1


def base_is_special(method: MergeMethod) -> bool:
    """Whether the base has its own role in the method (task vectors are taken from it, the
    method reads it, or it is slerp's t = 0 end point). Then a ``models:`` entry that is the
    base is the base, not one more input (mergekit: it is not a non-base model); for the others
    (linear, karcher, passthrough...) a listed base is an input like any model."""
    return method.space == "delta" or method.uses_base or interpolates_from_base(method)


def check_listed_base(method: MergeMethod, has_base: bool, n_models: int) -> None:
    """After a listed base is taken out of the models: a two-model method (slerp) given a base
    interpolates between the base and exactly one model."""
    if interpolates_from_base(method) and has_base and n_models != 1:
        raise RecipeError(f"merge_method {method.name} with base_model interpolates from the "
                          f"base (t = 0) to one model (t = 1); the recipe lists {n_models} "
                          "models besides the base")
    if n_models == 0:
        raise RecipeError("models: only the base model is listed; list the models to merge")


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
            raise RecipeError(f"{where}: unknown parameter {short_repr(key)} for sparsifier "
                              f"{sparsifier.name}{did_you_mean(key, specs)}; known: "
                              f"{', '.join(specs) or 'none'}")
        _check_value(specs[key], value, where)
    return tuple(_setting(p, (where, block_params)) for p in specs.values())


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

def _check_length(param: Param, value: list[Any], where: str, what: str) -> None:
    if len(value) > MAX_LIST_ITEMS:
        raise RecipeError(f"{where}: '{param.name}' has {len(value)} {what}; at most "
                          f"{MAX_LIST_ITEMS} per parameter (one per layer and module of the "
                          "largest models)")


def _check_value(param: Param, value: Any, where: str) -> None:
    entries = as_filter_list(value)
    if entries is not None:
        _check_length(param, entries, where, "filter entries")
        for i, entry in enumerate(entries):
            _check_value(param, entry.value, f"{where}.{param.name}[{i}]")
    elif is_gradient(param, value):
        if not value:
            raise RecipeError(f"{where}: '{param.name}' is an empty list; give a value, or "
                              "gradient anchors over layer depth")
        _check_length(param, value, where, "gradient anchors")
        for i, anchor in enumerate(value):
            param.check(anchor, f"{where}.{param.name}[{i}]")
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
                    f"models.{i}: task name {short_repr(entry.task_name)} is also models.{seen[entry.task_name]}'s;"
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


def _model_specs(recipe: Recipe, method: MergeMethod, i: int, places: Sequence[Place]
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
    else:  # given in ``places``: compiled (typed) once _check_keys has checked them
        specs.update(sp_specs)
        settings = ()
    return specs, SparsifyStep(sp, settings, from_block)


def _default_step(method: MergeMethod, step: SparsifyStep | None, places: Sequence[Place]
                  ) -> SparsifyStep | None:
    """The method's own trim step with its settings compiled from the model's places."""
    if step is None or step.from_block:
        return step
    specs = step_specs(method, step.sparsifier, from_block=False)
    return replace(step, settings=tuple(_setting(p, *places) for p in specs.values()))


def _unknown_key_message(key: str, where: str, method: MergeMethod, method_specs: dict,
                         model_keys: set[str], recipe: Recipe) -> str:
    known = sorted(set(method_specs) | model_keys)
    extra = ""
    if key == "density" and (recipe.sparsify or any(m.sparsify for m in recipe.models)):
        extra = " (a sparsify block replaces the method's own trim: put density in that block)"
    return (f"{where}: unknown parameter {short_repr(key)} for {method.name}"
            f"{did_you_mean(key, known)}"
            f"{extra}; known: {', '.join(known) or 'none'}")


def _check_keys(recipe: Recipe, method: MergeMethod, per_model: list[dict[str, Param]],
                shared: Sequence[Place], labels: Sequence[str]) -> None:
    """Every key of the method-wide (recipe, slice) and per-model ``parameters`` is known,
    typed and in range."""
    method_specs = {p.name: p for p in method.params}
    all_model_keys = set().union(*per_model) if per_model else set()
    for where, block in shared:
        for key, value in (block or {}).items():
            if key in method_specs:
                _check_value(method_specs[key], value, where)
            elif key in all_model_keys:
                for specs in per_model:
                    if key in specs:
                        _check_value(specs[key], value, where)
            else:
                raise RecipeError(_unknown_key_message(key, where, method, method_specs,
                                                       all_model_keys, recipe))
    for i, entry in enumerate(recipe.models):
        for key, value in entry.parameters.items():
            where = f"{labels[i]}.parameters"
            if key in per_model[i]:
                _check_value(per_model[i][key], value, where)
            elif key in method_specs:
                raise RecipeError(f"{where}: {short_repr(key)} is method-wide; move it to the top-level "
                                  "parameters (or the slice's; mergekit ignores it here)")
            else:
                raise RecipeError(_unknown_key_message(key, where, method, method_specs,
                                                       set(per_model[i]), recipe))


def _check_required(recipe: Recipe, method: MergeMethod, per_model: list[dict[str, Param]],
                    shared: Sequence[Place], labels: Sequence[str]) -> None:
    """A required parameter must be given: method-wide ones in ``parameters``, per-model ones
    there or in every model's own ``parameters``."""
    given = {k for _, block in shared for k in (block or {})}
    for p in method.params:
        if p.required and p.name not in given:
            raise RecipeError(f"parameters: merge_method {method.name} needs '{p.name}' "
                              f"({p.help})")
    for entry, specs, label in zip(recipe.models, per_model, labels, strict=True):
        for p in specs.values():
            if p.required and p.name not in entry.parameters and p.name not in given:
                raise RecipeError(f"{label}.parameters: merge_method {method.name} needs "
                                  f"'{p.name}' for every model ({p.help}); give it per model "
                                  "or in the top-level parameters")


def _check_global_scope(recipe: Recipe, shared: Sequence[Place]) -> None:
    places: Sequence[Mapping[str, Any]] = [
        *(block or {} for _, block in shared), *(m.parameters for m in recipe.models),
        recipe.sparsify or {}, *((m.sparsify or {}) for m in recipe.models)]
    if any(isinstance(p.get("scope"), str) and p["scope"] == "global" for p in places):
        for src in [*(block or {} for _, block in shared), *(m.parameters for m in recipe.models)]:
            if as_filter_list(src.get("density")) is not None or isinstance(src.get("density"),
                                                                              list):
                raise RecipeError("scope: global needs one density per model, not a filter list "
                                  "or a gradient")


Scope = tuple[str, Block]  # a slice's own parameters: (where in the recipe, the block)


def resolve_job(recipe: Recipe, scope: Scope | None = None,
                model_labels: Sequence[str] | None = None) -> JobParams:
    """Check every key, type and range of every parameter (raising a one-line RecipeError on
    the first problem) and compile them into the job's ``JobParams``. ``scope``: a slice's
    parameters, between the models' and the recipe's (mergekit's precedence); ``model_labels``:
    where each model is written in the recipe (default ``models.i``)."""
    try:
        method = METHODS.get(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"merge_method: {exc}") from None
    labels = list(model_labels or (f"models.{i}" for i in range(len(recipe.models))))
    shared: list[Place] = [*([scope] if scope else []), ("parameters", recipe.parameters)]
    _check_models(recipe, method)
    per_model, steps, places = [], [], []
    for i, entry in enumerate(recipe.models):
        places.append([(f"{labels[i]}.parameters", entry.parameters), *shared])
        specs, step = _model_specs(recipe, method, i, places[i])
        per_model.append(specs)
        steps.append(step)
    _check_keys(recipe, method, per_model, shared, labels)
    _check_required(recipe, method, per_model, shared, labels)
    _check_global_scope(recipe, shared)
    models = tuple(
        ModelParams(i, entry.task_name,
                    {p.python_name: _setting(p, *places[i]) for p in method.model_params},
                    _default_step(method, steps[i], places[i]))
        for i, entry in enumerate(recipe.models))
    return JobParams(method=method,
                     settings=tuple(_setting(p, *shared) for p in method.params),
                     models=models,
                     base_first=base_is_first_input(method, bool(recipe.base_model),
                                                    len(recipe.models)))
