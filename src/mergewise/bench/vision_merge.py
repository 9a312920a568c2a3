"""Merging vision experts with ``mergewise merge``: recipes, calibration files, and the TADrop
report grouped by EfficientNet module kind (stem, depthwise, pointwise, head, bn).

Why: the question the TADrop paper leaves open is whether tensor-wise adaptive drop carries over
to CNNs, where a depthwise kernel (k·k values per channel) and a pointwise kernel (a matrix)
have very different magnitude distributions. The merge report already holds d, the drop rate
and the kept count of every tensor; ``kind_table`` sums them per ``vision_model.module_kind``
(the generic ``report.module_kind`` knows transformer names only).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .vision_model import module_kind
from .vision_tasks import ImageSplit, batch_pixels

FACTORY = "mergewise.bench.vision_model:lite0_backbone"


def kind_table(report: Mapping[str, Any] | str | Path) -> list[dict[str, Any]]:
    """Per task and module kind: tensors, elements, d (mean / min / max), the mean per-tensor and
    the element-weighted realised drop rate over the tensors with a d, and how many had none.

    "Realised" here is 1 - (non-zero kept entries) / numel: entries already 0 in the task vector
    count as dropped. The report's ``sparsifiers[].realised_drop_rate`` is another figure — the
    element-weighted mean of the *assigned* per-tensor rates over every observed tensor, d-less
    and skipped ones at 0 — so the two differ (e.g. 0.783 by kind vs 0.770 there on a
    digits/animals TIES + TADrop merge): neither is wrong, they answer different questions."""
    if not isinstance(report, Mapping):
        report = json.loads(Path(report).read_text())
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in report.get("rows", []):
        groups[(row["task"], module_kind(row["tensor"]))].append(row)
    out = []
    for (task, kind), rows in sorted(groups.items()):
        # a tensor without d has a zero task vector (frozen BN statistics): the report counts it
        # as kept 0 of n, which is no drop decision, so it stays out of the drop rates
        rated = [r for r in rows if r.get("d") is not None]
        known = [r for r in rated if r.get("kept") is not None]
        numel = sum(r["numel"] for r in known)
        rates = [r["drop_rate"] for r in rated if r.get("drop_rate") is not None]
        ds = [r["d"] for r in rated]
        out.append({
            "task": task, "kind": kind, "tensors": len(rows), "numel": sum(r["numel"] for r in rows),
            "mean_d": statistics.fmean(ds) if ds else None,
            "min_d": min(ds) if ds else None, "max_d": max(ds) if ds else None,
            "mean_drop_rate": statistics.fmean(rates) if rates else None,
            "realised_drop_rate": 1.0 - sum(r["kept"] for r in known) / numel if numel else None,
            "without_d": len(rows) - len(rated),
        })
    return out


def format_kind_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of ``kind_table`` rows."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    cols = ["task", "kind", "tensors", "numel", "mean_d", "min_d", "max_d", "mean_drop_rate",
            "realised_drop_rate", "without_d"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_calibration(path: Path, split: ImageSplit, n: int) -> Path:
    """The first ``n`` images of ``split`` as normalised float32 (n, 3, H, W) ``.npy`` inputs."""
    np.save(path, batch_pixels(split.images[:n]).numpy(), allow_pickle=False)
    return path


def vision_recipe(base: Path, experts: Mapping[str, Path], method: str,
                  parameters: Mapping[str, Any] | None = None,
                  sparsify: Mapping[str, Any] | None = None,
                  calibration: Mapping[str, Path] | None = None,
                  num_examples: int = 64, batch_size: int = 16,
                  factory: str = FACTORY) -> dict[str, Any]:
    """A recipe merging ``experts`` ({task: checkpoint dir}) over ``base``; with
    ``calibration`` ({task: .npy}) each model gets a calibration block run through ``factory``."""
    models = []
    for task, path in experts.items():
        entry: dict[str, Any] = {"model": str(path), "name": task}
        if calibration is not None:
            entry["calibration"] = {"data": str(calibration[task]), "num_examples": num_examples,
                                    "batch_size": batch_size, "factory": factory}
        models.append(entry)
    recipe: dict[str, Any] = {"merge_method": method, "base_model": str(base), "models": models,
                              "dtype": "float32"}
    if parameters:
        recipe["parameters"] = dict(parameters)
    if sparsify:
        recipe["sparsify"] = dict(sparsify)
    return recipe
