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

from ..errors import FeatureError
from .calibration import calibration_settings
from .capture import CaptureReport, capture_expert
from .statsfile import FeatureStats, load_stats


@dataclass
class FeatureSource:
    """Where one model's statistics come from: an existing stats file, or a capture."""

    task: str
    model: Path
    stats_path: Path | None  # read if it exists, else written by the capture
    data: Path | None
    calibration: Any = None  # recipe.Calibration

    @property
    def cached(self) -> bool:
        return self.stats_path is not None and self.stats_path.is_file()


def plan_sources(recipe: Any, root: Path | None, model_paths: Sequence[Path],
                 overwrite: bool = False) -> list[FeatureSource]:
    """Resolve every stats file and calibration data path of a recipe; report all that is
    missing at once, before any model is loaded."""
    anchor = root if root is not None else Path.cwd()
    sources, missing = [], []
    for i, (entry, model) in enumerate(zip(recipe.models, model_paths, strict=True)):
        stats_path = None
        if entry.features:
            stats_path = Path(entry.features).expanduser()
            stats_path = stats_path if stats_path.is_absolute() else anchor / stats_path
        data = None
        cal = entry.calibration
        if cal is not None:
            data = Path(cal.data).expanduser()
            data = data if data.is_absolute() else anchor / data
        src = FeatureSource(entry.task_name, model, stats_path, data, cal)
        needs_capture = overwrite or not src.cached
        if needs_capture and cal is None:
            missing.append(f"models.{i}.features: stats file {stats_path} does not exist and "
                           "the model has no calibration block to compute it")
        elif needs_capture and not data.is_file():  # type: ignore[union-attr]
            missing.append(f"models.{i}.calibration.data: {data} does not exist")
        sources.append(src)
    if missing:
        raise FeatureError("; ".join(missing))
    return sources


def obtain(sources: Sequence[FeatureSource], *, seed: int, tokenizer_paths: Sequence[Path] = (),
           root: Path | None = None, workdir: Path | None = None, overwrite: bool = False,
           device: str = "cpu", progress: Callable[[CaptureReport], None] | None = None
           ) -> tuple[list[FeatureStats], list[CaptureReport]]:
    """Every model's statistics, file-backed (read lazily): existing stats files are reused
    (their calibration settings must match the block), the others captured and written to the
    model's ``features:`` path, or to ``workdir``."""
    out, reports = [], []
    for src in sources:
        cal = src.calibration
        if src.cached and not overwrite:
            stats = load_stats(src.stats_path)  # type: ignore[arg-type]
            if cal is not None:
                want = calibration_settings(src.data, cal.num_examples, cal.batch_size,  # type: ignore[arg-type]
                                            cal.max_length, seed, cal.text_field)
                have = json.loads(stats.metadata.get("calibration", "{}"))
                skip = {"data"} | ({"data_sha256"} if want["data_sha256"] is None else set())
                diff = sorted(k for k in want if k not in skip and have.get(k) != want[k])
                if diff:
                    stats.close()
                    raise FeatureError(f"{src.stats_path}: was computed with other calibration "
                                       f"settings ({', '.join(diff)} differ); delete it, or "
                                       "recompute with `mergewise features --overwrite`")
            out.append(stats)
            continue
        stats, report = capture_expert(
            src.model, src.data, num_examples=cal.num_examples,  # type: ignore[arg-type]
            batch_size=cal.batch_size, max_length=cal.max_length, seed=seed,
            text_field=cal.text_field, tokenizer_paths=tokenizer_paths, factory=cal.factory,
            root=root, task=src.task, device=device)
        target = src.stats_path or (workdir or Path.cwd()) / f"{src.task.replace(os.sep, '_')}.features.safetensors"
        report.path = stats.save(target)
        del stats
        out.append(load_stats(target))
        reports.append(report)
        if progress is not None:
            progress(report)
    return out, reports
