"""``mergewise inspect``: TADrop statistics of experts' task vectors, without merging, + plots.

It runs exactly the stats pass a ``task_arithmetic`` + TADrop merge would run (same validation,
same quantiles, same drop-rate mapping), writes ``inspect.json`` / ``inspect.csv`` with one row
per (expert, tensor), and draws three PNGs: |tau| histograms of the lowest- and highest-d
tensors, d per layer depth by module kind, and drop rate vs d.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .api import open_recipe_checkpoints
from .engine import MergeJob
from .recipe import parse_recipe
from .report import layer_index, module_kind, plot_d_by_layer, plot_drop_vs_d, plot_histograms, write_tables

HIST_SAMPLE = 2_000_000  # values drawn per histogram (a seeded subsample of huge tensors)


@dataclass
class Inspection:
    rows: list[dict[str, Any]]
    files: list[Path]
    d_ref: list[float | None]


def inspect_experts(experts: list[str], base: str, out: str | Path | None = None,
                    tadrop: dict[str, Any] | None = None, dtype: str = "float32",
                    device: str = "cpu", plots: bool = True) -> Inspection:
    """Per-tensor d, drop rate and norms of each expert's task vector; plots into ``out``."""
    block = {"method": "tadrop", **(tadrop or {})}
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": base,
                           "models": [{"model": e} for e in experts], "sparsify": block,
                           "dtype": dtype}, "inspect")
    base_ckpt, models, _ = open_recipe_checkpoints(recipe, None)
    with contextlib.ExitStack() as stack:
        for c in [base_ckpt, *models]:
            stack.callback(c.close)  # type: ignore[union-attr]
        job = MergeJob(recipe, base_ckpt, models, device=device)
        job.run_stats_pass()
        rows = []
        for slot in job.slots:
            for plan in job.tensors:
                if not plan.merged:
                    continue
                decided = slot.stats.for_tensor(plan.name)  # type: ignore[union-attr]
                rows.append({
                    "task": slot.task, "tensor": plan.name, "kind": module_kind(plan.name),
                    "layer": layer_index(plan.name), "numel": plan.numel,
                    "d": decided.d if decided else None,
                    "drop_rate": decided.drop_rate if decided else None,
                    "kept": None, "kept_fraction": None, "norm_before": None,
                    "norm_after": None, "rescale": None,
                })
        d_ref = [getattr(s.stats, "d_ref", None) for s in job.slots]
        files: list[Path] = []
        if out is not None:
            out_dir = Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            report = {"mergewise_version": __version__, "base": base, "experts": experts,
                      "tadrop": job.sparsifier_params(job.slots[0], job.tensors[0].name),
                      "d_ref": d_ref}
            write_tables(out_dir, report, rows, stem="inspect")
            files += [out_dir / "inspect.json", out_dir / "inspect.csv"]
            if plots:
                files += _plots(job, rows, out_dir)
        return Inspection(rows=rows, files=files, d_ref=d_ref)


def _plots(job: MergeJob, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    first = job.slots[0]
    own = sorted((r for r in rows if r["task"] == first.task and r["d"] is not None),
                 key=lambda r: r["d"])
    picks = [("lowest d", r) for r in own[:3]] + [("highest d", r) for r in own[-3:][::-1]]
    samples = []
    base = job.base
    for label, r in picks:
        delta = (job._load(first.ckpt, r["tensor"]) - job._load(base, r["tensor"])).abs()
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
