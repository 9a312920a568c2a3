"""Which model gets which statistics: stats files, captures and the reuse rules.

``plan_sources`` resolves every model's stats file (``features:``) and calibration data of a
recipe, reporting all that is missing at once before any model is loaded; ``obtain`` reuses an
existing stats file only when its calibration settings (the data identified by content hash, so a
moved project keeps its files) match the model's block, and captures and writes the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FeatureError, RecipeError
from ..recipe import CAPTURE_OPTIONS, Calibration, Recipe
from .calibration import calibration_settings
from .capture import CaptureReport, capture_expert
from .statsfile import FeatureStats, load_stats


@dataclass(frozen=True)
class StatsKind:
    """What a method's statistics are: how one model's are captured (``capture`` takes
    ``capture_expert``'s arguments plus ``capture_args(calibration)``) and read back, which
    calibration settings beyond ``calibration_settings`` they depend on (compared on reuse),
    and the file name of a capture without a ``features:`` path (``TASK.<name>.safetensors``)."""

    name: str
    capture: Callable[..., tuple[FeatureStats, CaptureReport]]
    load: Callable[[Path], FeatureStats]
    capture_args: Callable[[Calibration], dict[str, Any]] = lambda cal: {}
    settings: Callable[[Calibration], dict[str, Any]] = lambda cal: {}


def _gram_args(cal: Calibration) -> dict[str, Any]:
    return {"pack": cal.pack, "accumulate": cal.accumulate}


def _gram_settings(cal: Calibration) -> dict[str, Any]:
    """``pack`` and ``accumulate`` as ``calibration_settings`` records them: only when not
    the default, so stats files written before these options existed still match."""
    return ({"pack": True} if cal.pack else {}) | (
        {"accumulate": cal.accumulate} if cal.accumulate != "float64" else {})


# layer inputs: LOT, RegMean
GRAMS = StatsKind("features", capture_expert, load_stats, _gram_args, _gram_settings)


@dataclass
class FeatureSource:
    """Where one model's statistics come from: an existing stats file, or a capture."""

    task: str
    model: Path
    stats_path: Path | None  # read if it exists, else written by the capture
    data: Path | None  # the calibration data file; None without a calibration block
    calibration: Calibration | None = None
    adapter_base: Path | None = None  # a LoRA adapter model: the model it applies to

    @property
    def cached(self) -> bool:
        return self.stats_path is not None and self.stats_path.is_file()


def plan_sources(recipe: Recipe, root: Path | None, model_paths: Sequence[Path],
                 overwrite: bool = False, adapter_bases: Sequence[Path | None] = ()
                 ) -> list[FeatureSource]:
    """Resolve every stats file and calibration data path of a recipe; report all that is
    missing at once, before any model is loaded. ``adapter_bases[i]``: the model that model
    i, a LoRA adapter, applies to (``InputPaths.adapter_targets``)."""
    check_options(recipe)
    anchor = root if root is not None else Path.cwd()
    sources: list[FeatureSource] = []
    missing: list[str] = []
    for i, (entry, model) in enumerate(zip(recipe.models, model_paths, strict=True)):
        stats_path = _anchored(entry.features, anchor) if entry.features else None
        cal = entry.calibration
        data = _anchored(cal.data, anchor) if cal is not None else None
        over = adapter_bases[i] if adapter_bases else None
        src = FeatureSource(entry.task_name, model, stats_path, data, cal, over)
        if overwrite or not src.cached:  # it needs a capture
            if data is None:
                missing.append(f"models.{i}.features: stats file {stats_path} does not exist and "
                               "the model has no calibration block to compute it")
            elif not data.is_file():
                missing.append(f"models.{i}.calibration.data: {data} does not exist")
        sources.append(src)
    if missing:
        raise FeatureError("; ".join(missing))
    return sources


def check_options(recipe: Recipe) -> None:
    """Refuse every calibration option (``CAPTURE_OPTIONS``) a model's block sets to a value
    other than its default although the method's capture does not honour it (its registry
    entry's ``calibration_options``): it would be silently ignored, the result not what the
    recipe says. All offenders in one line."""
    method = recipe.method
    refused = []
    for i, entry in enumerate(recipe.models):
        cal = entry.calibration
        for option, purpose in CAPTURE_OPTIONS.items():
            if cal is None or option in method.calibration_options \
                    or getattr(cal, option) == Calibration.model_fields[option].default:
                continue
            why = method.calibration_why.get(option)
            refused.append(f"models.{i}.calibration.{option}: merge_method {method.name} does "
                           f"not honour it ({option}: {purpose}"
                           + (f"; {method.name} {why}" if why else "") + ")")
    if refused:
        raise RecipeError("; ".join(refused) + "; remove the option"
                          + ("s" if len(refused) > 1 else ""))


def _anchored(path: str, anchor: Path) -> Path:
    """A recipe path: ``~`` expanded, relative ones taken from the recipe's directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else anchor / p


def obtain(sources: Sequence[FeatureSource], *, seed: int, tokenizer_paths: Sequence[Path] = (),
           root: Path | None = None, workdir: Path | None = None, overwrite: bool = False,
           device: str = "cpu", progress: Callable[[CaptureReport], None] | None = None,
           kind: StatsKind = GRAMS) -> tuple[list[FeatureStats], list[CaptureReport]]:
    """Every model's statistics, file-backed (read lazily): existing stats files are reused
    (their calibration settings must match the block), the others captured and written to the
    model's ``features:`` path, or to ``workdir``."""
    out: list[FeatureStats] = []
    reports: list[CaptureReport] = []
    for src in sources:
        existing = src.stats_path if src.cached and not overwrite else None
        if existing is not None:
            out.append(_reuse(src, existing, seed, kind))
            continue
        cal, data = _calibration_of(src)
        target = src.stats_path or (workdir or Path.cwd()) / f"{src.task.replace(os.sep, '_')}.{kind.name}.safetensors"
        settings = dict(num_examples=cal.num_examples, batch_size=cal.batch_size,
                        max_length=cal.max_length, seed=seed, text_field=cal.text_field,
                        tokenizer_paths=tokenizer_paths, factory=cal.factory, root=root,
                        device=device, adapter_base=src.adapter_base,
                        **kind.capture_args(cal))
        # a few blocks' Grams at a time (other kinds refuse the option: check_options)
        if cal.blocks_per_pass is not None and kind is GRAMS:
            from .streaming import stream_expert  # it imports sequential, which imports us

            report = stream_expert(src.model, data, target, blocks_per_pass=cal.blocks_per_pass,
                                   task=src.task, **settings)
        else:
            stats, report = kind.capture(src.model, data, task=src.task, **settings)
            report.path = stats.save(target)
            del stats
        out.append(kind.load(target))
        reports.append(report)
        if progress is not None:
            progress(report)
    return out, reports


def _reuse(src: FeatureSource, path: Path, seed: int, kind: StatsKind = GRAMS) -> FeatureStats:
    """The existing stats file of ``src``, refused when it was computed with other calibration
    settings than the model's block asks for (the data compared by content, not by path)."""
    stats = kind.load(path)
    if src.calibration is None:
        return stats
    cal, data = _calibration_of(src)
    want = calibration_settings(data, cal.num_examples, cal.batch_size, cal.max_length, seed,
                                cal.text_field) | kind.settings(cal)
    have = json.loads(stats.metadata.get("calibration", "{}"))
    skip = {"data"} | ({"data_sha256"} if want["data_sha256"] is None else set())
    keys = set(want) | ({"pack", "accumulate"} & set(have))  # recorded when not the default
    diff = sorted(k for k in keys if k not in skip and have.get(k) != want.get(k))
    if diff:
        stats.close()
        raise FeatureError(f"{path}: was computed with other calibration settings "
                           f"({', '.join(diff)} differ); delete it, or recompute with "
                           "`mergewise features --overwrite`")
    return stats


def _calibration_of(src: FeatureSource) -> tuple[Calibration, Path]:
    """The calibration block and data path of a source that needs them (``plan_sources`` has
    checked that every such source has both)."""
    if src.calibration is None or src.data is None:
        raise FeatureError(f"{src.task}: no stats file to read and no calibration block (and data "
                           "path) to compute one")
    return src.calibration, src.data
