"""A ``slices:`` recipe as one ``MergeJob`` per slice over shared open checkpoints.

``params.slice_specs`` validates and lays the slices out; this opens every source once, plans
each slice's tensors (``plan.plan_slice``: renumbered blocks, embeddings from the first slice,
final norm and head from the last) and builds its job. The jobs write, in order, into one output
whose config gets the new block count (``layers.restack_config``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, open_checkpoint
from .engine import MergeJob, check_filters_match
from .inputs import resolve_path
from .layers import restack_config
from .params import SliceSpec, slice_specs
from .plan import PlanSummary, TensorPlan, plan_slice, summarize
from .recipe import Recipe
from .tensors import float_dtype


@dataclass
class SlicedMerge:
    """The jobs of a ``slices:`` recipe, the checkpoint that gives the output its config and
    tag-along files, and for every output block the reference block it came from."""

    jobs: list[MergeJob]
    reference: Checkpoint
    source_layers: list[int]

    def summary(self) -> PlanSummary:
        tensors = [p for job in self.jobs for p in job.tensors]
        widest = max(self.jobs, key=lambda j: len(j.weight_inputs))
        n_inputs = len(widest.weight_inputs) + (1 if widest.reads_base else 0)
        passes = max(job.summary().stats_passes for job in self.jobs)
        return summarize(tensors, len(widest.slots), n_inputs, widest.compute_dtype, passes)

    def config(self) -> dict[str, Any] | None:
        config = self.reference.config
        return None if config is None else restack_config(config, self.source_layers)


def _reference_of(spec: SliceSpec) -> tuple[str, tuple[int, int]]:
    """The source a slice's tensors are planned on: its base, else its first model."""
    if spec.base_range is not None:
        assert spec.recipe.base_model is not None
        return spec.recipe.base_model, spec.base_range
    return spec.recipe.models[0].model, spec.ranges[0]


def open_sliced(recipe: Recipe, root: Path | None, stack: contextlib.ExitStack,
                device: str = "cpu") -> SlicedMerge:
    """Resolve and open every source once (all paths checked first), then plan each slice."""
    specs = slice_specs(recipe)
    written = list(dict.fromkeys(m for s in specs for m in s.sources
                                 + ([s.recipe.base_model] if s.recipe.base_model else [])))
    paths = {m: resolve_path(m, root, f"slices: model '{m}'") for m in written}
    opened: dict[Path, Checkpoint] = {}
    for p in paths.values():
        if p.resolve() not in opened:
            opened[p.resolve()] = stack.enter_context(open_checkpoint(p))

    def ckpt(model: str) -> Checkpoint:
        return opened[paths[model].resolve()]

    out = float_dtype(recipe.out_dtype) if recipe.out_dtype else None
    jobs, source_layers = [], []
    for spec in specs:
        ref_model, ref_range = _reference_of(spec)
        models = [ckpt(m.model) for m in spec.recipe.models]
        base = ckpt(spec.recipe.base_model) if spec.recipe.base_model else None
        tensors = _plan(spec, ckpt(ref_model), ref_range, models, base, out)
        jobs.append(MergeJob(spec.recipe, base, models, device=device,  # type: ignore[arg-type]
                             tensors=tensors, scope=spec.scope, labels=spec.labels,
                             check_filters=False))
        source_layers += list(range(*ref_range))
    check_filters_match(jobs)
    reference = ckpt(recipe.base_model) if recipe.base_model else jobs[0].reference
    return SlicedMerge(jobs, reference, source_layers)


def _plan(spec: SliceSpec, reference: Checkpoint, ref_range: tuple[int, int],
          models: list[Checkpoint], base: Checkpoint | None, out: Any) -> list[TensorPlan]:
    return plan_slice(reference, ref_range, models, spec.ranges, base, spec.base_range,
                      spec.out_start, first=spec.first, last=spec.last, out_dtype=out,
                      where=f"slices.{spec.index}")
