"""Recipes: the pydantic schema of a recipe and YAML loading, with one-line errors.

The shape follows mergekit's core fields (``merge_method``, ``base_model``, ``models`` with
per-model ``parameters``, method-wide ``parameters``, ``dtype``, ``out_dtype``) so its users can
switch. What a parameter value may be (scalars, filter lists) and every rule about parameters
(validation, precedence, resolution per tensor) live in ``params.py``; ``parse_recipe`` runs
that validation, so a parsed ``Recipe`` is a valid one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, did_you_mean, first_line, short_repr
from .params import ParamValue, check_filter_total, resolve_job, slice_specs
from .registry import METHODS, MergeMethod, as_kind
from .tensors import FLOAT_DTYPE_NAMES

DTypeName = Literal[FLOAT_DTYPE_NAMES]  # type: ignore[valid-type]  # the one dtype table

# The recipe's own numbers follow the parameters' type rule (registry.as_kind): no NaN or Inf,
# no boolean for a number, no fraction for an int, nothing past INT_LIMIT.
Int = Annotated[int, BeforeValidator(lambda v: as_kind(v, int))]
Float = Annotated[float, BeforeValidator(lambda v: as_kind(v, float))]
Bool = Annotated[bool, BeforeValidator(lambda v: as_kind(v, bool))]
SEED_LIMIT = 2**63 - 1  # torch generators take 64-bit seeds; a seed is no count
Seed = Annotated[int, BeforeValidator(lambda v: as_kind(v, int, SEED_LIMIT))]

# Bounds of a recipe file, checked before and while YAML reads it (real recipes are a few kB):
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB; also what is copied into every output shard's header
MAX_DEPTH = 20  # nesting levels (a slices: recipe's filter-list gradients need 10)
MAX_EXPANDED = 2 * MAX_RECIPE_BYTES  # nodes + scalar characters once aliases are expanded


class Calibration(BaseModel):
    """A model's calibration data for data-aware methods (LOT, RegMean, RegMean++, Fisher);
    which of the options (``CAPTURE_OPTIONS``) a method honours, its registry entry says."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="text (.txt, .jsonl) or tensor (.pt, .safetensors, .npy) file")
    num_examples: Int = Field(64, ge=1, description="examples drawn (seeded by the recipe's seed)")
    max_length: Int = Field(128, ge=1, description="tokens per text example (truncation)")
    batch_size: Int = Field(8, ge=1)
    text_field: str = Field("text", description="the text key of each .jsonl line")
    factory: str | None = Field(None, description="'module:function' building the torch module "
                                "of a plain (non Hugging Face) checkpoint")
    labels: Literal["auto", "expected", "sample", "argmax"] = Field(
        "auto", description="fisher only: the model's own labels its Fisher is computed with "
        "(expected: every class weighted by its probability; sample: one drawn; argmax)")
    pack: bool = Field(False, description="texts packed into full max_length rows (causal LMs) "
                       "instead of one padded, truncated row each")
    accumulate: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the Gram sums (float32 halves memory and stats files; "
                               "solves stay float64)")
    blocks_per_pass: Int | None = Field(
        None, ge=1, description="stream the capture: this many blocks' Grams in memory at a "
                                "time (one pass over the data per group), written to the stats file")


# The calibration options a data-aware method's capture may or may not honour (its registry
# entry lists those it does: ``MergeMethod.calibration_options``), with what each is for; every
# capture honours the other fields (the data and its seeded draw).
CAPTURE_OPTIONS = {
    "labels": "the model's own labels a Fisher is computed with",
    "pack": "texts packed into full max_length rows",
    "accumulate": "the dtype of the layer-input Gram sums",
    "blocks_per_pass": "streams the Gram capture into the stats file a few blocks at a time",
}


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
    layer_range: tuple[Int, Int]
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
    residual_weight: Float | None = Field(None, description="accepted for mergekit recipes, "
                                          "which parse it and never use it; no effect")


class TokenKind(BaseModel):
    """A ``tokens:`` entry's row: ``{kind: zero}``, or ``{kind: model_token, model, token_id |
    token}`` (a row of that model's original vocabulary)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero", "model_token"]
    model: str | None = None
    token_id: Int | None = Field(None, ge=0)
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
    force: Bool = False


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary (``union``, ``base`` or a model),
    per-token row sources, and padding of the row count."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenOverride] | None = None
    pad_to_multiple_of: Int | None = Field(None, ge=1)


class Recipe(BaseModel):
    """A merge recipe. Paths are kept as written; ``resolve_paths`` anchors relative ones.
    Exactly one of ``models`` and ``slices`` (mergekit's two forms)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[Slice] | None = Field(None, min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    sparsify: dict[str, ParamValue] | None = None
    dtype: DTypeName | None = None  # compute dtype; None: float32 (mergewise's default)
    out_dtype: DTypeName | None = None  # None: dtype when given (as mergekit), else the base's
    seed: Seed = Field(0, ge=0)
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
    """``models.0.parameters.density``; a key longer than 40 characters is cut (user text)."""
    parts = (str(p) for p in loc if p not in ("function-after[_shorthand(), list[ModelEntry]]",))
    return ".".join(p if len(p) <= 40 and p.isprintable() and p.strip() == p else short_repr(p, 40)
                    for p in parts)


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
    if isinstance(value, dict):  # one {filter, value} entry, or another model (TokenKind)
        inner = [{**e, "loc": prefix + e["loc"][i + 1:]} for e in errors
                 if e["loc"][:i] == prefix and len(e["loc"]) > i + 1
                 and isinstance(e["loc"][i], str) and e["loc"][i] not in _UNION_TAGS
                 and not e["loc"][i].startswith("list[")]
        if inner:
            return _simplify(inner)
    return err, f"{_format_loc(prefix)}: expected {_VALUE_HELP}; got {short_repr(value)}"


def _pydantic_message(exc: ValidationError) -> str:
    errors = exc.errors()
    # an unknown key explains a "missing" one (a typo), so report it first
    errors = ([e for e in errors if e["type"] == "extra_forbidden"]
              + [e for e in errors if e["type"] != "extra_forbidden"])
    err, message = _simplify(errors)
    if message is not None:
        return message
    # drop pydantic's union tags ("function-after[...]"); an unknown key (the last part of an
    # extra_forbidden location) is the user's own text and stays, whatever it contains
    keep_last = err["type"] == "extra_forbidden"
    loc = tuple(p for p in err["loc"][:-1 if keep_last else None]
                if not isinstance(p, str) or "[" not in p) + (err["loc"][-1:] if keep_last else ())
    where = _format_loc(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])[:200]
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
        return (f"unknown key {short_repr(key)} at {where}{did_you_mean(key, allowed)}; allowed: "
                f"{', '.join(allowed)}")
    if err["type"] == "missing":
        return f"missing required key '{loc[-1]}' at {where}"
    message = err["msg"].removeprefix("Value error, ")
    if not message.startswith("must ") and not isinstance(err.get("input"), (dict, list, tuple)):
        message += f", got {short_repr(err.get('input'))}"
    return f"{where}: {message}"


def _kind_of(data: Any) -> str:
    if data is None:
        return "an empty document"
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return f"{kinds.get(type(data), type(data).__name__)} ({short_repr(data, 40)})"


def _blocks(recipe: Recipe) -> list[Any]:
    """Every parameters and sparsify block of a recipe (the filter-entry budget counts them)."""
    blocks = [recipe.parameters, recipe.sparsify]
    for m in recipe.models:
        blocks += [m.parameters, m.sparsify]
    for sl in recipe.slices or ():
        blocks += [sl.parameters, *(src.parameters for src in sl.sources)]
    return blocks


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe dict: schema, method, parameters and sparsify blocks (no file access)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with at least merge_method and "
                          f"models; got {_kind_of(data)}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_pydantic_message(exc)}") from None
    check_filter_total(_blocks(recipe), source)
    try:
        if recipe.slices is not None:
            slice_specs(recipe)
        else:
            resolve_job(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one), nesting
    past MAX_DEPTH (PyYAML composes recursively), and reads YAML 1.2 exponent floats."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DEPTH} levels deep (a recipe needs about 10)",
                self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # int('9' * 5000), a 13th month...
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {short_repr(node.value)} "
                f"({first_line(exc, 80).split(':')[0]})",
                node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)} (first given at line "
                        f"{seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue  # unhashable key: the base class reports it
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 (and mergekit, whose pydantic turns the string into a number) reads 5e-1 and 1.0e5
# as floats; PyYAML's YAML 1.1 needs a dot and a signed exponent (5.0e-1) and reads them as
# strings. A recipe is read the YAML 1.2 way: quote such a text to keep it a string.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


class _Bound(Exception):
    """A bound of MAX_DEPTH / MAX_EXPANDED was passed at ``node``."""

    def __init__(self, node: yaml.Node, problem: str):
        super().__init__(problem)
        self.node, self.problem = node, problem


def _measure(node: yaml.Node, depth: int, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(size, height) of ``node`` with every alias expanded: size counts nodes and scalar
    characters, so an alias bomb (each anchor listing the previous one 9 times) is refused
    here in microseconds instead of being built, repr'd or validated for minutes. Shared nodes
    are measured once; an alias inside its own anchor passes MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise _Bound(node, f"nested more than {MAX_DEPTH} levels deep once aliases are expanded "
                     "(or an alias refers to itself)")
    known = memo.get(id(node))
    if known is not None:
        if depth + known[1] > MAX_DEPTH:
            raise _Bound(node, f"nested more than {MAX_DEPTH} levels deep once aliases are "
                         "expanded")
        return known
    if isinstance(node, yaml.ScalarNode):
        result = (1 + len(node.value), 0)
    else:
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair])
        size, height = 1, 0
        for child in children:
            child_size, child_height = _measure(child, depth + 1, memo)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_EXPANDED:
                raise _Bound(node, f"aliases (*name) expand the recipe past {MAX_EXPANDED:,} "
                             "nodes and characters (an alias bomb?); write the values out")
        result = (size, height)
    memo[id(node)] = result
    return result


def _load_yaml(text: str) -> Any:
    """One YAML document, bounded (depth, alias expansion) before any object is built."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error as one clause with its line; a second document said as such."""
    if getattr(exc, "context", None) == "expected a single document in the stream":
        mark = exc.problem_mark  # type: ignore[attr-defined]
        return (f"holds more than one YAML document (another starts at line {mark.line + 1}); "
                "keep one recipe per file")
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: no mark, a position
        at = f" at line {text.count(chr(10), 0, exc.position) + 1}"
    problem = getattr(exc, "problem", None) or first_line(exc)
    return f"invalid YAML{at}: {first_line(Exception(problem), 160)}"


def _read_text(p: Path) -> str:
    """The recipe's text: at most MAX_RECIPE_BYTES of UTF-8 (a UTF-8 BOM is fine), else a
    one-line RecipeError saying what the file is and how to fix it."""
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{p}: cannot read the recipe ({exc.strerror or exc})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{p}: the recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB "
                          f"({MAX_RECIPE_BYTES:,} bytes), the most mergewise reads; a recipe is "
                          "a few kB (use fewer, broader filters)")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError(f"{p}: the recipe is UTF-16 or UTF-32 text (it starts with a "
                          "byte-order mark); save it as UTF-8")
    if b"\x00" in raw:
        raise RecipeError(f"{p}: not a text file (a NUL byte at offset {raw.index(0)}); a recipe "
                          "is a UTF-8 YAML file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
                          "save the recipe as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Load a YAML recipe; returns it with the directory relative paths are resolved against."""
    p = Path(path)
    text = _read_text(p)
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p}: {_yaml_problem(exc, text)}") from None
    except _Bound as exc:
        mark = exc.node.start_mark
        raise RecipeError(f"{p}: at line {mark.line + 1}: {exc.problem}") from None
    return parse_recipe(data, str(p)), p.resolve().parent
