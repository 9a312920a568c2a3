"""The merge loop: plan -> (stats pass) -> merge pass, one tensor at a time.

``MergeJob`` binds a validated recipe (its parameters resolved once by ``params.resolve_job``)
to open checkpoints and plans the output (``plan.plan_tensors``). Stats pass (only when a
sparsifier asks, e.g. global TIES or TADrop): every task vector streams through the
sparsifier's ``StatsPass``. Merge pass: per tensor, load the base and the K inputs, upcast to
``dtype`` on ``device``, form task vectors, sparsify each with its own seeded generator, call the
method, check the result is finite, cast to the output dtype and hand it to a sink (the
streaming writer, or a dict for the Python API). At most K + 4 copies of one tensor (plus the
method's work space) are alive at a time.

Tensor rules: floating-point tensors are merged; integer and bool buffers are copied from the
reference (see ``plan``). A tensor whose (sparsified) task vectors are all zero is written as
the base tensor itself, bit for bit (cast only to ``out_dtype``), by every task-vector method.

Task-specific methods (EMR) return the unified tensor plus per-task modulators; ``run`` hands
the modulators of every merged tensor (None for an all-zero one) to a ``modulator_sink`` and
refuses to run without one, since the unified tensor alone is no task's model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from . import chunked
from .checkpoint import Checkpoint
from .errors import FeatureError, RecipeError
from .features.statsfile import FeatureStats
from .numerics import report_norm, stored_or_raise
from .params import JobParams, Scope, SparsifyStep, resolve_job
from .plan import PlanSummary, TensorPlan, check_configs, plan_tensors, summarize
from .readers import Prefetcher, TensorReader, VocabReader
from .recipe import Recipe
from .rng import tensor_generator
from .statspass import Observer, Progress, StatsCache, StatsPass, run_stats_pass
from .tensors import DEFAULT_COMPUTE_DTYPE, float_dtype
from .vocab import Alignment

# (tensor name, base in the compute dtype, stored output tensor, the method's modulators or None)
ModulatorSink = Callable[[str, "torch.Tensor | None", "torch.Tensor", Any], None]
Sink = Callable[[str, "torch.Tensor"], None]


def check_filters_match(jobs: Sequence[MergeJob]) -> None:
    """Refuse a filter entry that matches no tensor in any job it belongs to (a slice's own
    entries live in one job, the recipe's in all of them): one line naming every such entry."""
    present: dict[str, int] = {}
    missed: dict[str, int] = {}
    for job in jobs:
        names = job.tensor_names()
        for label in job.params.labels():
            present[label] = present.get(label, 0) + 1
        for label in job.params.unmatched(names):
            missed[label] = missed.get(label, 0) + 1
    bad = [label for label, n in missed.items() if n == present[label]]
    if bad:
        raise RecipeError(f"filter(s) matching no tensor of the merge: {'; '.join(bad)}; a "
                          "filter is a substring of tensor names (as in mergekit), e.g. "
                          "'self_attn' or 'mlp'; {glob: '*.mlp.*'} for a shell pattern")


@dataclass
class ModelSlot:
    """One input model: its checkpoint, its sparsification step and that step's stats pass."""

    index: int
    task: str
    ckpt: Checkpoint
    step: SparsifyStep | None = None
    stats: StatsPass | None = None


class MergeJob:
    """A validated recipe bound to open checkpoints: plan, then run into a sink."""

    def __init__(self, recipe: Recipe, base: Checkpoint | None, models: Sequence[Checkpoint],
                 device: str = "cpu", features: Sequence[FeatureStats] | None = None, *,
                 tensors: Sequence[TensorPlan] | None = None, scope: Scope | None = None,
                 labels: Sequence[str] | None = None, check_filters: bool = True,
                 vocab: Alignment | None = None, stats_cache: StatsCache | None = None):
        """``tensors`` and ``scope`` come from a slice of a ``slices:`` recipe (its planned
        tensors, and its own parameters between the models' and the recipe's); a slice's
        filters are checked over all slices (``check_filters_match``). ``vocab``: embedding and
        head rows aligned to one output vocabulary, over the inputs models then base.
        ``stats_cache``: per-tensor statistics of earlier runs (TADrop's d), reused."""
        self.recipe = recipe
        self.stats_cache = stats_cache
        self.params: JobParams = resolve_job(recipe, scope, labels)
        self.method = self.params.method
        self.base = base
        # names until a tensor is read: planning (a dry run) imports no torch
        self.compute_dtype_name = recipe.dtype or DEFAULT_COMPUTE_DTYPE
        self.load = TensorReader(device, self.compute_dtype_name)
        self.slots = [ModelSlot(m.index, m.task, ckpt, m.step)
                      for m, ckpt in zip(self.params.models, models, strict=True)]
        # the method's inputs, in order (a slerp-like method's base is its first end point)
        self.weight_inputs: list[Checkpoint] = ([base] if self.params.base_first and base
                                                else []) + list(models)
        self.reference = base if base is not None else models[0]
        # written in out_dtype, else in an explicit dtype (mergekit: the computed tensors are
        # written as they are), else in the base's dtype tensor by tensor
        written = recipe.out_dtype or recipe.dtype
        if tensors is not None:
            check_configs([c for c in (base, *models) if c is not None])
        self.vocab = vocab
        vocab_plan = None
        if vocab is not None:
            inputs = [*models, *([base] if base is not None else [])]
            ref_rows = vocab.input_rows[inputs.index(self.reference)]
            names = {n for n in self.reference.names()
                     if vocab.is_vocab_tensor(n, self.reference.info(n).shape, ref_rows)}
            self.load = VocabReader(self.load, vocab, inputs, names)  # type: ignore[assignment]
            vocab_plan = (names, vocab.rows)
        self.tensors: list[TensorPlan] = (list(tensors) if tensors is not None
                                          else plan_tensors(self.reference, list(models), written,
                                                            vocab_plan))
        if check_filters:
            check_filters_match([self])
        self.features: list[FeatureStats] | None = None
        if features is not None:
            self.set_features(features)

    @cached_property
    def compute_dtype(self) -> torch.dtype:
        return float_dtype(self.compute_dtype_name)

    @property
    def device(self) -> torch.device:
        return self.load.device

    def tensor_names(self) -> set[str]:
        """Every name the job writes or reads (what recipe filters may match)."""
        names = set()
        for plan in self.tensors:
            names |= {plan.name, plan.ref_name, plan.base_name, *(plan.input_names() or ())}
        return names

    @property
    def first_merged(self) -> str:
        return next(t.name for t in self.tensors if t.merged)

    def set_features(self, features: Sequence[FeatureStats]) -> None:
        """Attach one expert's statistics per model (data-aware methods): each is checked
        against its expert (probe tensors) and every tensor's shape, reading headers only."""
        if len(features) != len(self.slots):
            raise FeatureError(f"{self.method.name}: got statistics for {len(features)} models, "
                               f"the merge has {len(self.slots)}")
        merged = [t for t in self.tensors if t.merged]
        for slot, stats in zip(self.slots, features, strict=True):
            stats.check_model(slot.ckpt)
            matched = [t for t in merged if stats.kind_of(t.name, t.shape) is not None]
            if not matched:
                raise FeatureError(f"{stats.label}: no layer of these statistics matches a tensor "
                                   f"of {slot.ckpt.label} (task {slot.task}); were they captured "
                                   "from another architecture?")
        self.features = list(features)

    @property
    def reads_base(self) -> bool:
        """Whether the merge pass reads the base's tensors (task vectors, or a method that uses
        the base); a weight-space method's prepended base end point is in ``weight_inputs``."""
        return self.base is not None and (self.method.space == "delta" or self.method.uses_base)

    def summary(self) -> PlanSummary:
        n_inputs = len(self.weight_inputs) + (1 if self.reads_base else 0)
        stats = [s.step.stats_pass(self.first_merged) for s in self.slots if s.step is not None]
        passes = max((st.passes for st in stats if st is not None), default=0)
        return summarize(self.tensors, len(self.slots), n_inputs, self.compute_dtype_name, passes)

    def sparsifier_summary(self) -> list[dict[str, Any]]:
        """Per model: sparsifier, its parameters and what its stats pass decided globally."""
        out = []
        for slot in self.slots:
            entry: dict[str, Any] = {"task": slot.task,
                                     "sparsifier": slot.step.sparsifier.name if slot.step else None}
            if slot.step is not None:
                entry["parameters"] = slot.step.params(self.first_merged)
            for attr in ("d_ref", "threshold"):
                value = getattr(slot.stats, attr, None)
                if value is not None:
                    entry[attr] = float(value)
            if hasattr(slot.stats, "realised_drop_rate"):
                entry["realised_drop_rate"] = slot.stats.realised_drop_rate()
            out.append(entry)
        return out

    # --- computing ----------------------------------------------------------------------
    def _sparsify(self, slot: ModelSlot, plan: TensorPlan, source: str, delta: torch.Tensor,
                  info: dict[str, Any] | None) -> torch.Tensor:
        """Model ``slot``'s sparsification of its task vector for output tensor ``plan``: its
        parameters at the name it reads (``source``), its mask from (seed, model, output name)."""
        step = slot.step
        assert step is not None
        params = step.params(source, plan.t)
        gen = self.generator_for(slot, plan)
        stats = slot.stats.for_tensor(plan.name) if slot.stats is not None else None
        if step.sparsifier.reports and info is not None:
            params["info"] = info
        return step.sparsifier.func(delta, generator=gen, stats=stats, **params)

    def generator_for(self, slot: ModelSlot, plan: TensorPlan) -> torch.Generator | None:
        """The generator of ``slot``'s random sparsification of ``plan``: (seed, model, output
        name), whole or streamed; None for a deterministic one."""
        step = slot.step
        if step is None or not step.sparsifier.random:
            return None
        return tensor_generator(self.recipe.seed, slot.index, plan.name)

    def sources(self, plan: TensorPlan) -> list[str]:
        """The name each model reads for ``plan`` (the output name unless a frankenmerge)."""
        return plan.input_names() or [plan.name] * len(self.slots)

    def task_vectors(self, plan: TensorPlan, base: torch.Tensor,
                     record: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Sparsified task vectors of every model for output tensor ``plan``; with a
        ``record``, each model's norms and kept count go into ``record["models"]``."""
        deltas = []
        for slot, source in zip(self.slots, self.sources(plan), strict=True):
            # out of place: never touch inputs
            raw = self.load.delta(slot.ckpt, source, base, (self.base, plan.base_name))
            info: dict[str, Any] | None = {} if record is not None else None
            if info is not None:
                info["norm_before"] = report_norm(raw)
            delta = self._sparsify(slot, plan, source, raw, info) if slot.step else raw
            if info is not None:
                info["kept"] = int(torch.count_nonzero(delta))
                # a step that kept the tensor as it is (density 1) changed no norm
                info["norm_after"] = info["norm_before"] if delta is raw else report_norm(delta)
                record.setdefault("models", []).append(info)  # type: ignore[union-attr]
            deltas.append(delta)
        return deltas

    def _method_params(self, plan: TensorPlan, record: dict[str, Any] | None) -> dict[str, Any]:
        params = {**self.params.method_params(plan.name, plan.t),
                  **self.params.model_values(self.sources(plan), plan.t)}
        if self.method.features:
            if self.features is None:
                raise FeatureError(f"{self.method.name} needs calibration features for every "
                                   "model; none were given")
            params["features"] = [st.for_tensor(plan.name, plan.shape) for st in self.features]
            params["name"] = plan.name
            if record is not None:
                record["unit"] = next((f.kind for f in params["features"] if f is not None),
                                      "fallback")
        elif self.method.takes_name:
            params["name"] = plan.name
        return params

    def _merge_deltas(self, plan: TensorPlan, params: dict[str, Any],
                      record: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(merged weights, base, modulators) of a task-vector method."""
        assert self.base is not None
        base = self.load(self.base, plan.base_name)
        deltas = self.task_vectors(plan, base, record)
        modulators = None
        if not any(bool(d.any()) for d in deltas):
            # nothing moved: the base exactly, not its round trip through the compute dtype;
            # a copy (never the caller's own tensor), checked against out_dtype by the caller
            if record is not None:
                record["merged_delta_norm"] = 0.0
            if self.load.stored(plan.name) is None:
                return base.clone(), base, None  # the base's rows, aligned
            return self.base.read(plan.base_name).clone(), base, None
        weights = self.params.weights(self.sources(plan), plan.t)
        out = self.method.func(base, deltas, weights, **params)
        if self.method.task_specific:
            out, modulators = out.merged, out.modulators
        if record is not None:
            record["merged_delta_norm"] = report_norm(out, minus=base)
        return out, base, modulators

    def _merge_weights(self, plan: TensorPlan, params: dict[str, Any]) -> torch.Tensor:
        """The merged weights of a weight-space method (a prepended base is read under its
        own name)."""
        sources = self.sources(plan)
        names = ([plan.base_name] if self.params.base_first else []) + sources
        inputs = [self.load(c, n) for c, n in zip(self.weight_inputs, names, strict=True)]
        base = (self.load(self.base, plan.base_name)
                if self.method.uses_base and self.base is not None else None)
        return self.method.func(base, inputs, self.params.weights(sources, plan.t), **params)

    def merge_tensor(self, plan: TensorPlan, record: dict[str, Any] | None = None,
                     modulator_sink: ModulatorSink | None = None) -> torch.Tensor:
        """The merged tensor in ``plan.out_dtype``; a task-specific method's per-task
        modulators go to ``modulator_sink`` (None when every task vector was zero)."""
        name = plan.name
        if not plan.merged:
            reader = self.load.read if isinstance(self.load, VocabReader) else self.load
            return reader.raw(self.reference, plan.ref_name).clone()  # unmerged: never aligned
        params = self._method_params(plan, record)
        if chunked.applies(self, plan):
            merged = chunked.merge(self, plan, params, record)
            if merged is not None:
                return merged
        modulators = base = None
        if self.method.space == "weight":
            out = self._merge_weights(plan, params)
        else:
            out, base, modulators = self._merge_deltas(plan, params, record)
            if modulator_sink is None:
                base = None  # free it before the cast (peak memory)
        stored = stored_or_raise(out, plan.out_dtype, self.method.name, name)
        out = stored.cpu()
        if modulator_sink is not None:
            modulator_sink(name, base, out, modulators)
        return out

    def run_stats_pass(self, progress: Progress | None = None) -> None:
        for slot in self.slots:
            slot.stats = slot.step.stats_pass(self.first_merged) if slot.step else None
        observers = [Observer(s.ckpt, s.stats,
                              lambda plan, st=s.step, i=s.index: st.params(self.sources(plan)[i],
                                                                           plan.t),
                              lambda plan, i=s.index: self.sources(plan)[i])
                     for s in self.slots if s.stats is not None and s.step is not None]
        if self.base is not None:
            prefetch = self.load.prefetch if isinstance(self.load, TensorReader) else None
            run_stats_pass(self.load, self.base, observers, self.tensors, progress,
                           prefetch.ahead if prefetch is not None else None,
                           cache=self.stats_cache, dtype=self.compute_dtype)

    def run(self, sink: Sink, progress: Progress | None = None,
            stats_progress: Progress | None = None,
            modulator_sink: ModulatorSink | None = None) -> list[dict[str, Any]]:
        """Run the stats and merge passes, handing each output tensor to ``sink`` in plan order
        (and a task-specific method's per-task modulators of each merged tensor to
        ``modulator_sink``, which such a method requires)."""
        if self.method.task_specific and modulator_sink is None:
            tasks = ", ".join(s.task for s in self.slots)
            raise RecipeError(
                f"merge_method {self.method.name} yields one model per task (a unified task "
                "vector plus per-task masks and rescalers), not a single merged model; ask for "
                f"a task ({tasks}): merge_task_state_dicts(...)[task], "
                "merge_state_dicts(..., task=NAME), or `mergewise merge` then "
                "`mergewise materialize OUT --task NAME --out DIR`")
        reader = self.load.read if isinstance(self.load, VocabReader) else self.load
        reader.prefetch = Prefetcher()
        try:
            self.run_stats_pass(stats_progress)
            return self._merge_pass(sink, progress, modulator_sink, reader.prefetch)
        finally:
            reader.prefetch.close()
            reader.prefetch = None

    def reads(self, plan: TensorPlan) -> list[tuple[Checkpoint, str]]:
        """Every (checkpoint, name) the merge pass reads for ``plan``."""
        if not plan.merged:
            return [(self.reference, plan.ref_name)]
        inputs = [(s.ckpt, n) for s, n in zip(self.slots, self.sources(plan), strict=True)]
        if self.params.base_first and self.base is not None:
            inputs.insert(0, (self.base, plan.base_name))
        if self.reads_base and self.base is not None:
            inputs.append((self.base, plan.base_name))
        if isinstance(self.load, VocabReader) and plan.name in self.load.names:
            inputs = [(c, plan.name) for c in self.load.inputs]
        return inputs

    def _merge_pass(self, sink: Sink, progress: Progress | None,
                    modulator_sink: ModulatorSink | None,
                    prefetch: Prefetcher) -> list[dict[str, Any]]:
        n_inputs = len(self.weight_inputs) + (1 if self.reads_base else 0)
        records = []
        for i, plan in enumerate(self.tensors):
            if i + 1 < len(self.tensors):
                prefetch.ahead(self.reads(self.tensors[i + 1]))
            start = time.perf_counter()
            record: dict[str, Any] = {"name": plan.name, "shape": list(plan.shape),
                                      "numel": plan.numel, "merged": plan.merged}
            out = self.merge_tensor(plan, record, modulator_sink)
            prefetch.forget(self.reads(plan))
            sink(plan.name, out)
            record["seconds"] = round(time.perf_counter() - start, 6)
            records.append(record)
            if progress is not None:
                progress(plan.name, plan.numel * plan.in_dtype.itemsize * n_inputs)
        return records
