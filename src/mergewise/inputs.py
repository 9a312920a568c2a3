"""A recipe's inputs on disk: every path resolved once, then the checkpoints opened lazily.

Relative paths are resolved against the recipe's directory, then the current directory; every
missing path is an error naming the recipe key before anything is opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, open_checkpoint
from .errors import RecipeError
from .params import base_is_special, check_listed_base, resolve_job
from .recipe import Recipe


def resolve_path(path: str, root: Path | None, key: str) -> Path:
    """``path`` as given in the recipe at ``key``: absolute, or under ``root``, or under the
    current directory; the first that exists."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = ([root / p] if root is not None else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise RecipeError(f"{key}: '{path}' does not exist (looked for {tried})")


@dataclass(frozen=True)
class InputPaths:
    """Where a recipe's base, models and tokenizer live."""

    base: Path | None
    models: list[Path]
    tokenizer_source: Path | None  # an explicit tokenizer_source path (not "base")

    def tokenizer_candidates(self) -> list[Path]:
        """Where a tokenizer is looked for, in order: the explicit ``tokenizer_source``, then
        the base (text calibration data, and the tokenizer files of the output)."""
        return [p for p in (self.tokenizer_source, self.base) if p is not None]


def without_listed_base(recipe: Recipe, paths: InputPaths) -> tuple[Recipe, InputPaths]:
    """Take a ``models:`` entry that is the base itself (same file or directory) out of the
    inputs when the base has its own role in the method (``params.base_is_special``), as
    mergekit does; the recipe is re-validated with the remaining models."""
    method = recipe.method
    if paths.base is None or not base_is_special(method):
        return recipe, paths
    base = paths.base.resolve()
    keep = [i for i, p in enumerate(paths.models) if p.resolve() != base]
    check_listed_base(method, True, len(keep))
    if len(keep) == len(paths.models):
        return recipe, paths
    models = [recipe.models[i] for i in keep]
    trimmed = Recipe.model_validate({**recipe.model_dump(exclude_none=True),
                                     "models": [m.model_dump(exclude_none=True) for m in models]})
    resolve_job(trimmed)
    return trimmed, InputPaths(paths.base, [paths.models[i] for i in keep], paths.tokenizer_source)


def resolve_inputs(recipe: Recipe, root: Path | None) -> InputPaths:
    base = resolve_path(recipe.base_model, root, "base_model") if recipe.base_model else None
    models = [resolve_path(m.model, root, f"models.{i}.model")
              for i, m in enumerate(recipe.models)]
    source = recipe.vocabulary.source if recipe.vocabulary is not None else None
    tok = (resolve_path(source, root, "tokenizer_source")
           if source is not None and source not in ("base", "union") else None)
    return InputPaths(base, models, tok)


@contextlib.contextmanager
def open_inputs(base: Path | str | None, models: Sequence[Path | str]
                ) -> Iterator[tuple[Checkpoint | None, list[Checkpoint]]]:
    """Open the base and the models (headers only); all are closed on exit or on error."""
    with contextlib.ExitStack() as stack:
        base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
        yield base_ckpt, [stack.enter_context(open_checkpoint(m)) for m in models]


def _candidates(path: str, root: Path | None) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    return ([root / p] if root is not None else []) + [Path.cwd() / p]


def protected_paths(recipe: Recipe, root: Path | None, recipe_file: Path | None = None,
                    extra: Sequence[tuple[str, Path]] = ()) -> list[tuple[str, Path]]:
    """Every path a merge reads or keeps (what it is, path), existing or not: the output may
    be none of them, inside none and contain none (``target.check_not_an_input``)."""
    named: list[tuple[str, str]] = []
    if recipe.base_model:
        named.append(("the base model", recipe.base_model))
    for i, m in enumerate(recipe.models):
        named.append((f"input model {i}", m.model))
        if m.features:
            named.append((f"the features file of model {i}", m.features))
        if m.calibration is not None:
            named.append((f"the calibration data of model {i}", m.calibration.data))
    for s, block in enumerate(recipe.slices or []):
        if block.base_model:
            named.append((f"the base model of slice {s}", block.base_model))
        named += [(f"input model of slice {s}", src.model) for src in block.sources]
    for source in (recipe.tokenizer_source, recipe.tokenizer.source if recipe.tokenizer else None):
        if source and source not in ("base", "union"):
            named.append(("the tokenizer source", source))
    out = [(what, c) for what, text in named for c in _candidates(text, root)]
    if recipe_file is not None:
        out.append(("the recipe", recipe_file))
    return out + list(extra)
