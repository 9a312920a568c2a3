"""``mergewise inspect``: TADrop statistics of experts' task vectors, without merging, + plots.

It runs exactly the stats pass a ``task_arithmetic`` + TADrop merge would run (same validation,
same quantiles, same drop-rate mapping), writes ``inspect.json`` / ``inspect.csv`` with one row
per (expert, tensor), and draws three PNGs: |tau| histograms of the lowest- and highest-d
tensors, d per layer depth by module kind, and drop rate vs d.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RecipeError
from .inputs import open_inputs
from .params import sparsify_step
from .plan import TensorPlan, plan_tensors
from .readers import TensorReader
from .recipe import ModelEntry
from .report import layer_index, module_kind, plot_d_by_layer, plot_drop_vs_d, plot_histograms, write_tables
from .statspass import Observer, run_stats_pass
from .tensors import FLOAT_DTYPE_NAMES, float_dtype
from .version import __version__

HIST_SAMPLE = 2_000_000  # values drawn per histogram (a seeded subsample of huge tensors)


@dataclass
class Inspection:
    rows: list[dict[str, Any]]
    files: list[Path]
    d_ref: list[float | None]


def _rows(task: str, stats: Any, tensors: list[TensorPlan]) -> list[dict[str, Any]]:
    rows = []
    for plan in tensors:
        if not plan.merged:
            continue
        decided = stats.for_tensor(plan.name)
        rows.append({
            "task": task, "tensor": plan.name, "kind": module_kind(plan.name),
            "layer": layer_index(plan.name), "numel": plan.numel,
            "d": decided.d if decided else None,
            "drop_rate": decided.drop_rate if decided else None,
            "kept": None, "kept_fraction": None, "norm_before": None,
            "norm_after": None, "rescale": None,
        })
    return rows


def inspect_experts(experts: list[str], base: str, out: str | Path | None = None,
                    tadrop: dict[str, Any] | None = None, dtype: str = "float32",
                    device: str = "cpu", plots: bool = True) -> Inspection:
    """Per-tensor d, drop rate and norms of each expert's task vector; plots into ``out``."""
    if not experts:
        raise RecipeError("inspect: give at least one fine-tuned checkpoint")
    step = sparsify_step({"method": "tadrop", **(tadrop or {})}, "inspect: sparsify")
    if dtype not in FLOAT_DTYPE_NAMES:
        raise RecipeError(f"inspect: dtype '{dtype}' is not one of {', '.join(FLOAT_DTYPE_NAMES)}")
    read = TensorReader(device, float_dtype(dtype))
    with open_inputs(base, experts) as (base_ckpt, models):
        assert base_ckpt is not None
        tensors = plan_tensors(base_ckpt, models)
        first = next(t.name for t in tensors if t.merged)
        passes = [step.stats_pass(first) for _ in models]
        run_stats_pass(read, base_ckpt, [Observer(m, st, lambda p: step.params(p.name, p.t))
                                         for m, st in zip(models, passes, strict=True)], tensors)
        tasks = [ModelEntry(model=e).task_name for e in experts]
        rows = [r for task, st in zip(tasks, passes, strict=True) for r in _rows(task, st, tensors)]
        d_ref = [getattr(st, "d_ref", None) for st in passes]
        files: list[Path] = []
        if out is not None:
            out_dir = Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            report = {"mergewise_version": __version__, "base": base, "experts": experts,
                      "tadrop": step.params(first), "d_ref": d_ref}
            write_tables(out_dir, report, rows, stem="inspect")
            files += [out_dir / "inspect.json", out_dir / "inspect.csv"]
            if plots:
                files += _plots(read, base_ckpt, models[0], tasks[0], rows, out_dir)
        return Inspection(rows=rows, files=files, d_ref=d_ref)


def _plots(read: TensorReader, base: Any, first: Any, task: str, rows: list[dict[str, Any]],
           out_dir: Path) -> list[Path]:
    own = sorted((r for r in rows if r["task"] == task and r["d"] is not None),
                 key=lambda r: r["d"])
    picks = [("lowest d", r) for r in own[:3]] + [("highest d", r) for r in own[-3:][::-1]]
    samples = []
    for label, r in picks:
        delta = (read(first, r["tensor"]) - read(base, r["tensor"])).abs()
        flat = delta.reshape(-1).float().cpu()
        if flat.numel() > HIST_SAMPLE:
            gen = torch.Generator().manual_seed(0)
            flat = flat[torch.randint(flat.numel(), (HIST_SAMPLE,), generator=gen)]
        samples.append((label, r["tensor"], r["d"], flat.numpy()))
    paths = [out_dir / "hist_extremes.png", out_dir / "d_by_layer.png", out_dir / "drop_vs_d.png"]
    plot_histograms(samples, paths[0])
    plot_d_by_layer(rows, paths[1])
    plot_drop_vs_d(rows, paths[2])
    return paths
