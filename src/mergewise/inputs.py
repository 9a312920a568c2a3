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
from .errors import CheckpointError, RecipeError
from .lora import LoraCheckpoint, is_adapter_dir, split_plus
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
    # per model: the model a mergekit 'model+adapter' entry's adapter applies to (else None)
    adapter_bases: tuple[Path | None, ...] = ()

    def adapter_targets(self) -> list[Path | None]:
        """Per model, the model a LoRA adapter applies to (its ``model+adapter`` model, else
        the base); None for a model that is no adapter."""
        over = list(self.adapter_bases) or [None] * len(self.models)
        return [(o or self.base) if is_adapter_dir(Path(m)) else None
                for m, o in zip(self.models, over, strict=True)]

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
    over = (tuple(paths.adapter_bases[i] for i in keep) if paths.adapter_bases else ())
    return trimmed, InputPaths(paths.base, [paths.models[i] for i in keep], paths.tokenizer_source,
                               over)


def resolve_model(text: str, root: Path | None, key: str) -> tuple[Path, Path | None]:
    """A ``models:`` entry: (its path, None), or for mergekit's ``model+adapter`` (a path that
    does not exist as written) (the adapter directory, the model it applies to)."""
    halves = split_plus(text)
    if halves is None or any(c.exists() for c in _candidates(text, root)):
        return resolve_path(text, root, key), None
    model, adapter = halves
    adapter_dir = resolve_path(adapter, root, key)
    if not is_adapter_dir(adapter_dir):
        raise RecipeError(f"{key}: '{text}': {adapter_dir} is not a PEFT adapter directory (no "
                          "adapter_config.json); 'model+adapter' applies a LoRA adapter to a model")
    return adapter_dir, resolve_path(model, root, key)


def resolve_inputs(recipe: Recipe, root: Path | None) -> InputPaths:
    base = resolve_path(recipe.base_model, root, "base_model") if recipe.base_model else None
    resolved = [resolve_model(m.model, root, f"models.{i}.model")
                for i, m in enumerate(recipe.models)]
    source = recipe.vocabulary.source if recipe.vocabulary is not None else None
    tok = (resolve_path(source, root, "tokenizer_source")
           if source is not None and source not in ("base", "union") else None)
    over = tuple(b for _, b in resolved)
    return InputPaths(base, [p for p, _ in resolved], tok, over if any(over) else ())


def _open_model(path: Path | str, base: Checkpoint | None, base_path: Path | str | None,
                over: Path | None) -> Checkpoint:
    """A model: a checkpoint, or a LoRA adapter applied to ``over`` (default: the base; the
    base's own checkpoint object, so that its task vector is the adapter's delta exactly)."""
    p = Path(path)
    if not is_adapter_dir(p):
        return open_checkpoint(p)
    if over is None or (base_path is not None and Path(over).resolve() == Path(base_path).resolve()):
        if base is None:
            raise CheckpointError(f"{p}: is a LoRA adapter; the recipe needs a base_model for it "
                                  "to apply to (or write 'model+adapter')")
        return LoraCheckpoint(p, base, label=str(p) if over is None else f"{over}+{p}")
    model = open_checkpoint(over)
    try:
        return LoraCheckpoint(p, model, owns_base=True, label=f"{over}+{p}")
    except BaseException:
        model.close()
        raise


@contextlib.contextmanager
def open_inputs(base: Path | str | None, models: Sequence[Path | str],
                adapter_bases: Sequence[Path | None] = ()
                ) -> Iterator[tuple[Checkpoint | None, list[Checkpoint]]]:
    """Open the base and the models (headers only); all are closed on exit or on error. A
    model that is a PEFT adapter directory is applied to ``adapter_bases[i]`` when given (a
    ``model+adapter`` entry), else to the base."""
    with contextlib.ExitStack() as stack:
        base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
        over = list(adapter_bases) or [None] * len(models)
        yield base_ckpt, [stack.enter_context(_open_model(m, base_ckpt, base, o))
                          for m, o in zip(models, over, strict=True)]


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
        named += [(f"input model {i}", text) for text in (m.model, *(split_plus(m.model) or ()))]
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
