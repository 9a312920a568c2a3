"""Recipes: pydantic models, YAML loading and full validation before any tensor is read.

The shape follows mergekit's core fields (``merge_method``, ``base_model``, ``models`` with
per-model ``parameters``, method-wide ``parameters``, ``dtype``, ``out_dtype``) so its users can
switch. A parameter value is a scalar or a list of ``{filter: GLOB, value: X}`` entries matched
against the tensor name with shell-style globs (``*`` crosses dots); the first match wins and an
entry without ``filter`` matches everything. Per-model values override method-wide ones.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError, did_you_mean
from .registry import METHODS, SPARSIFIERS, MergeMethod, Param, Scalar, Sparsifier

DTypeName = Literal["float32", "float64", "bfloat16", "float16"]


ListValue = list[float] | list[str]


class FilterValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: bool | int | float | str | ListValue


ParamValue = bool | int | float | str | list[FilterValue] | ListValue


class Calibration(BaseModel):
    """A model's calibration data for data-aware methods (LOT, RegMean)."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="text (.txt, .jsonl) or tensor (.pt, .safetensors, .npy) file")
    num_examples: int = Field(64, ge=1, description="examples drawn (seeded by the recipe's seed)")
    max_length: int = Field(128, ge=1, description="tokens per text example (truncation)")
    batch_size: int = Field(8, ge=1)
    text_field: str = Field("text", description="the text key of each .jsonl line")
    factory: str | None = Field(None, description="'module:function' building the torch module "
                                "of a plain (non Hugging Face) checkpoint")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    name: str | None = Field(None, description="task name (defaults to the directory name)")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    sparsify: dict[str, ParamValue] | None = None
    calibration: Calibration | None = None
    features: str | None = Field(None, description="stats file: read if it exists, else "
                                 "written from the calibration block")

    @property
    def task_name(self) -> str:
        return self.name or Path(self.model).name


class Recipe(BaseModel):
    """A merge recipe. Paths are kept as written; ``resolve_paths`` anchors relative ones."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    sparsify: dict[str, ParamValue] | None = None
    dtype: DTypeName = "float32"
    out_dtype: DTypeName | None = None
    seed: int = Field(0, ge=0)
    tokenizer_source: str | None = None
    name: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    # --- derived views -------------------------------------------------------------------
    @property
    def method(self) -> MergeMethod:
        return METHODS.get(self.merge_method)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        return yaml.safe_dump(data, sort_keys=False)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after[_shorthand(), list[ModelEntry]]",))


_ALLOWED_TOP = list(Recipe.model_fields)
_ALLOWED_MODEL = list(ModelEntry.model_fields)
_ALLOWED_CALIBRATION = list(Calibration.model_fields)


_UNION_TAGS = ("bool", "int", "float", "str")
_VALUE_HELP = ("a number, a string, true/false, a list of numbers or strings, or a list of "
               "{filter: GLOB, value: X} entries")


def _union_at(loc: tuple[Any, ...]) -> int | None:
    """Index of the first union-branch tag pydantic put in ``loc`` (parameter values)."""
    for i, p in enumerate(loc):
        if isinstance(p, str) and (p in _UNION_TAGS or p.startswith("list[")):
            return i
    return None


def _simplify(errors: list[Any]) -> tuple[Any, str | None]:
    """Reduce pydantic's one-error-per-union-branch report to the error that explains the
    problem: (error with a plain loc, or a ready message for a value of the wrong shape)."""
    err = errors[0]
    i = _union_at(err["loc"])
    if i is None:
        return err, None
    prefix = err["loc"][:i]
    group = [e for e in errors if e["loc"][:i] == prefix and _union_at(e["loc"]) == i]
    value = next((e["input"] for e in group if len(e["loc"]) == i + 1), err["input"])
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        inner = [{**e, "loc": prefix + e["loc"][i + 1:]} for e in group
                 if e["loc"][i] == "list[FilterValue]"]
        if inner:
            return _simplify(inner)
    return err, f"{_format_loc(prefix)}: expected {_VALUE_HELP}; got {value!r}"


def _pydantic_message(exc: ValidationError) -> str:
    errors = exc.errors()
    # an unknown key explains a "missing" one (a typo), so report it first
    errors = ([e for e in errors if e["type"] == "extra_forbidden"]
              + [e for e in errors if e["type"] != "extra_forbidden"])
    err, message = _simplify(errors)
    if message is not None:
        return message
    loc = tuple(p for p in err["loc"] if not isinstance(p, str) or "[" not in p)
    where = _format_loc(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        if len(loc) >= 3 and isinstance(loc[-2], int) and loc[-3] != "models":
            allowed = ["filter", "value"]  # an entry of a filter list
        elif len(loc) == 3 and loc[0] == "models":
            allowed = _ALLOWED_MODEL
        elif len(loc) == 4 and loc[0] == "models" and loc[2] == "calibration":
            allowed = _ALLOWED_CALIBRATION
        else:
            allowed = _ALLOWED_TOP
        return (f"unknown key '{key}' at {where}{did_you_mean(key, allowed)}; allowed: "
                f"{', '.join(allowed)}")
    if err["type"] == "missing":
        return f"missing required key '{loc[-1]}' at {where}"
    return f"{where}: {err['msg']}"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe dict: schema, method, parameters and sparsify blocks (no file access)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with at least merge_method and models")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_pydantic_message(exc)}") from None
    try:
        validate_parameters(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first given at line {seen[key] + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue  # unhashable key: the base class reports it
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Load a YAML recipe; returns it with the directory relative paths are resolved against."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RecipeError(f"{p}: cannot read the recipe ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{p}: invalid YAML{at}: {problem}") from None
    return parse_recipe(data, str(p)), p.resolve().parent


# --- parameter schema ------------------------------------------------------------------------

def sparsifier_for(recipe: Recipe, model_index: int) -> tuple[Sparsifier | None, dict[str, ParamValue],
                                                                 bool]:
    """The sparsifier of one model: (sparsifier, its explicit params, from_block).

    ``from_block`` is True when a ``sparsify:`` block (per model or method-wide) replaces the
    method's own trim/drop step; its params then come from the block only.
    """
    method = recipe.method
    block = recipe.models[model_index].sparsify or recipe.sparsify
    if block is not None:
        name = block.get("method")
        if not isinstance(name, str):
            raise RecipeError("a sparsify block needs 'method: NAME' (e.g. method: magnitude)")
        params = {k: v for k, v in block.items() if k != "method"}
        global_block = recipe.sparsify or {}
        if recipe.models[model_index].sparsify is not None and global_block.get("method") == name:
            params = {**{k: v for k, v in global_block.items() if k != "method"}, **params}
        try:
            sparsifier = SPARSIFIERS.get(name)
        except RecipeError as exc:
            where = (f"models.{model_index}.sparsify" if recipe.models[model_index].sparsify
                     else "sparsify")
            raise RecipeError(f"{where}.method: {exc}") from None
        return sparsifier, params, True
    if method.sparsifier is None:
        return None, {}, False
    return SPARSIFIERS.get(method.sparsifier), {}, False


def sparsifier_param_specs(method: MergeMethod, sparsifier: Sparsifier, from_block: bool
                           ) -> dict[str, Param]:
    """The sparsifier's params, with the method's own defaults when it is the default step."""
    specs = {}
    overrides = method.block_defaults if from_block else method.sparsifier_defaults
    for p in sparsifier.params:
        if p.name in overrides:
            p = Param(**{**p.__dict__, "default": overrides[p.name]})
        specs[p.name] = p
    return specs


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], FilterValue)


def _check_value(param: Param, value: ParamValue, where: str) -> None:
    if _is_filter_list(value):
        for i, entry in enumerate(value):
            param.check(entry.value, f"{where}.{param.name}[{i}]")
    else:
        param.check(value, where)


def validate_parameters(recipe: Recipe) -> None:
    """Check every key, type and range of every parameter; raise on the first problem."""
    try:
        method = recipe.method
    except RecipeError as exc:
        raise RecipeError(f"merge_method: {exc}") from None
    n = len(recipe.models)
    if method.max_models is not None and method.max_models == 2 and recipe.base_model and n == 1:
        n = 2  # slerp-like: the base is the first end point
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
    method_specs = {p.name: p for p in method.params}
    model_specs_base = {p.name: p for p in method.model_params}
    per_model_specs: list[dict[str, Param]] = []
    for i in range(len(recipe.models)):
        specs = dict(model_specs_base)
        sp, block_params, from_block = sparsifier_for(recipe, i)
        if sp is not None:
            sp_specs = sparsifier_param_specs(method, sp, from_block)
            where = f"models.{i}.sparsify" if recipe.models[i].sparsify else "sparsify"
            for key, value in block_params.items():
                if key not in sp_specs:
                    raise RecipeError(f"{where}: unknown parameter '{key}' for sparsifier "
                                      f"{sp.name}{did_you_mean(key, sp_specs)}; known: "
                                      f"{', '.join(sp_specs) or 'none'}")
                _check_value(sp_specs[key], value, where)
            if not from_block:
                specs.update(sp_specs)
        per_model_specs.append(specs)
    all_model_keys = set().union(*per_model_specs) if per_model_specs else set()
    for key, value in recipe.parameters.items():
        if key in method_specs:
            _check_value(method_specs[key], value, "parameters")
        elif key in all_model_keys:
            for specs in per_model_specs:
                if key in specs:
                    _check_value(specs[key], value, "parameters")
        else:
            raise RecipeError(_unknown_key_message(key, "parameters", method, method_specs,
                                                   all_model_keys, recipe))
    for i, entry in enumerate(recipe.models):
        for key, value in entry.parameters.items():
            where = f"models.{i}.parameters"
            if key in per_model_specs[i]:
                _check_value(per_model_specs[i][key], value, where)
            elif key in method_specs:
                raise RecipeError(f"{where}: '{key}' is method-wide; move it to the top-level "
                                  "parameters")
            else:
                raise RecipeError(_unknown_key_message(key, where, method, method_specs,
                                                       set(per_model_specs[i]), recipe))
    scope_global = any(
        isinstance(v, str) and v == "global"
        for src in [recipe.parameters, *(m.parameters for m in recipe.models),
                    recipe.sparsify or {}, *((m.sparsify or {}) for m in recipe.models)]
        for k, v in src.items() if k == "scope"
    )
    if scope_global:
        for src in [recipe.parameters, *(m.parameters for m in recipe.models)]:
            if _is_filter_list(src.get("density")):
                raise RecipeError("scope: global needs one density per model, not a filter list")


def _unknown_key_message(key: str, where: str, method: MergeMethod, method_specs: dict,
                         model_keys: set[str], recipe: Recipe) -> str:
    known = sorted(set(method_specs) | model_keys)
    extra = ""
    if key == "density" and (recipe.sparsify or any(m.sparsify for m in recipe.models)):
        extra = " (a sparsify block replaces the method's own trim: put density in that block)"
    return (f"{where}: unknown parameter '{key}' for {method.name}{did_you_mean(key, known)}"
            f"{extra}; known: {', '.join(known) or 'none'}")


def resolve(value: ParamValue | None, tensor_name: str) -> Scalar | None:
    """The value that applies to ``tensor_name``: scalars apply everywhere; first filter match."""
    if value is None or not _is_filter_list(value):
        return value
    for entry in value:
        if entry.filter is None or entry.filter == "*" or fnmatch.fnmatchcase(tensor_name,
                                                                                entry.filter):
            return entry.value
    return None
