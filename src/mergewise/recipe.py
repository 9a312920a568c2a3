"""Recipes: the pydantic schema of a recipe and YAML loading, with one-line errors.

The shape follows mergekit's core fields (``merge_method``, ``base_model``, ``models`` with
per-model ``parameters``, method-wide ``parameters``, ``dtype``, ``out_dtype``) so its users can
switch. What a parameter value may be (scalars, filter lists) and every rule about parameters
(validation, precedence, resolution per tensor) live in ``params.py``; ``parse_recipe`` runs
that validation, so a parsed ``Recipe`` is a valid one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, did_you_mean, first_line
from .params import ParamValue, resolve_job, slice_specs
from .registry import METHODS, MergeMethod
from .tensors import FLOAT_DTYPES

DTypeName = Literal[tuple(FLOAT_DTYPES)]  # type: ignore[valid-type]  # the one dtype table


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


class SliceSource(BaseModel):
    """One model's layers in a slice (mergekit): ``layer_range: [a, b]`` is blocks a..b-1."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} must be [start, end] with "
                             "0 <= start < end (end excluded, as mergekit)")
        return value


class Slice(BaseModel):
    """A run of output blocks (mergekit's ``slices:``): each source gives the same number of
    blocks; ``parameters`` apply to this slice; ``base_model`` overrides the recipe's."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    residual_weight: float | None = Field(None, description="accepted for mergekit recipes, "
                                          "which parse it and never use it; no effect")


class TokenKind(BaseModel):
    """A ``tokens:`` entry's row: ``{kind: zero}``, or ``{kind: model_token, model, token_id |
    token}`` (a row of that model's original vocabulary)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero", "model_token"]
    model: str | None = None
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> TokenKind:
        if self.kind == "model_token" and (self.model is None
                                           or (self.token_id is None) == (self.token is None)):
            raise ValueError("kind: model_token needs 'model' and one of 'token_id' or 'token'")
        return self


class TokenOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str | TokenKind
    force: bool = False


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary (``union``, ``base`` or a model),
    per-token row sources, and padding of the row count."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenOverride] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


class Recipe(BaseModel):
    """A merge recipe. Paths are kept as written; ``resolve_paths`` anchors relative ones.
    Exactly one of ``models`` and ``slices`` (mergekit's two forms)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    sparsify: dict[str, ParamValue] | None = None
    dtype: DTypeName | None = None  # compute dtype; None: float32 (mergewise's default)
    out_dtype: DTypeName | None = None  # None: dtype when given (as mergekit), else the base's
    seed: int = Field(0, ge=0)
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    name: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _torch_prefix(cls, value: Any) -> Any:
        """mergekit accepts ``torch.bfloat16`` too."""
        return value.removeprefix("torch.") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if self.slices is not None and self.models:
            raise ValueError("give either 'models' or 'slices', not both (as mergekit)")
        if self.slices is None and not self.models:
            raise ValueError("missing required key 'models' (or 'slices'): list the models to "
                             "merge")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give tokenizer_source or a tokenizer: block, not both (as mergekit)")
        return self

    @property
    def vocabulary(self) -> TokenizerBlock | None:
        """The tokenizer settings, ``tokenizer_source: X`` being ``tokenizer: {source: X}``."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerBlock(source=self.tokenizer_source) if self.tokenizer_source else None

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
_ALLOWED_SLICE = list(Slice.model_fields)
_ALLOWED_SOURCE = list(SliceSource.model_fields)


_UNION_TAGS = ("bool", "int", "float", "str")
_VALUE_HELP = ("a number, a string, true/false, a list of numbers or strings (a gradient), "
               "or a list of {filter: TEXT, value: X} entries")


def _union_at(loc: tuple[Any, ...]) -> int | None:
    """Index of the first union-branch tag pydantic put in ``loc`` (parameter values)."""
    for i, p in enumerate(loc):
        if isinstance(p, str) and (p in _UNION_TAGS or p.startswith("list[")
                                   or "FilterValue" in p):
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
                 if e["loc"][i].startswith("list[") and "FilterValue" in e["loc"][i]]
        if inner:
            return _simplify(inner)
    if isinstance(value, dict):  # one {filter, value} entry
        inner = [{**e, "loc": prefix + e["loc"][i + 1:]} for e in group
                 if not e["loc"][i].startswith("list[") and "FilterValue" in e["loc"][i]]
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
        value_maps = ("parameters", "sparsify")
        if (len(loc) >= 4 and isinstance(loc[-2], int) and loc[-4] in value_maps) \
                or (len(loc) >= 3 and loc[-3] in value_maps):
            allowed = ["filter", "glob", "value"]  # an entry of a filter list
        elif len(loc) == 3 and loc[0] == "models":
            allowed = _ALLOWED_MODEL
        elif len(loc) == 4 and loc[0] == "models" and loc[2] == "calibration":
            allowed = _ALLOWED_CALIBRATION
        elif len(loc) == 3 and loc[0] == "slices":
            allowed = _ALLOWED_SLICE
        elif len(loc) == 5 and loc[0] == "slices" and loc[2] == "sources":
            allowed = _ALLOWED_SOURCE
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
        if recipe.slices is not None:
            slice_specs(recipe)
        else:
            resolve_job(recipe)
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
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise RecipeError(f"{p}: invalid YAML{at}: {problem}") from None
    return parse_recipe(data, str(p)), p.resolve().parent
