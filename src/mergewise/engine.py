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

import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import chunked
from .checkpoint import Checkpoint, StateDictCheckpoint
from .errors import FeatureError, MergewiseError, RecipeError, short_repr
from .features.statsfile import FeatureStats
from .numerics import all_finite, check_finite, report_norm, stored_or_raise
from .params import JobParams, Scope, SparsifyStep, resolve_job
from .plan import PlanSummary, TensorPlan, check_configs, plan_tensors, summarize
from .recipe import Recipe
from .rng import tensor_generator
from .statspass import Observer, Progress, StatsCache, StatsPass, run_stats_pass
from .tensors import DEFAULT_COMPUTE_DTYPE, FLOAT_DTYPES
from .vocab import Alignment

# (tensor name, base in the compute dtype, stored output tensor, the method's modulators or None)
ModulatorSink = Callable[[str, "torch.Tensor | None", torch.Tensor, Any], None]
Sink = Callable[[str, torch.Tensor], None]


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


class Prefetcher:
    """Reads the next tensor's inputs on a background thread while the current one is merged
    (positional file reads release the GIL, as torch's kernels do). One tensor ahead at most,
    so memory grows by one tensor per input; in-memory inputs are never prefetched."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergewise-read")
        self._pending: dict[tuple[int, str], Future[torch.Tensor]] = {}

    def ahead(self, reads: Sequence[tuple[Checkpoint, str]]) -> None:
        for ckpt, name in reads:
            key = (id(ckpt), name)
            if (key not in self._pending and not isinstance(ckpt, StateDictCheckpoint)
                    and ckpt.prefetches(name)):
                self._pending[key] = self._pool.submit(ckpt.read, name)

    def take(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        future = self._pending.pop((id(ckpt), name), None)
        return future.result() if future is not None else ckpt.read(name)

    def forget(self, reads: Sequence[tuple[Checkpoint, str]]) -> None:
        """Drop what was read ahead for a tensor and not used (so nothing piles up)."""
        for ckpt, name in reads:
            future = self._pending.pop((id(ckpt), name), None)
            if future is not None:
                future.cancel()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


def compute_device(device: str | torch.device) -> torch.device:
    """The one check of ``--device`` (merge, materialize, inspect), before any tensor is read:
    ``cpu``, ``cuda`` or ``cuda:N`` of a GPU torch sees; anything else (``meta``, ``mps``, a
    typo) is one line, not a torch error mid-merge or a merge of empty meta tensors."""
    text = str(device)
    match = re.fullmatch(r"cpu|cuda(?::([0-9]{1,4}))?", text)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sees = (f"torch sees {count} CUDA device{'s' if count != 1 else ''}" if count
            else "torch sees no CUDA device")
    shown = short_repr(text, 40)
    if match is None:
        raise MergewiseError(f"--device {shown}: give cpu, cuda or cuda:N ({sees})")
    if text != "cpu" and (count == 0 or int(match.group(1) or 0) >= count):
        raise MergewiseError(f"--device {shown}: {sees}; use --device cpu"
                             + (f" or cuda:0..{count - 1}" if count else ""))
    return torch.device(text)


class TensorReader:
    """Read one tensor, move it to the compute device, upcast it, check it is finite. May
    return the caller's own tensor (in-memory inputs already in the compute dtype): never
    modify the result in place. While ``prefetch`` is set, reads come from it."""

    def __init__(self, device: str | torch.device, dtype: torch.dtype):
        self.device = compute_device(device)
        self.dtype = dtype
        self.prefetch: Prefetcher | None = None

    def raw(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        return self.prefetch.take(ckpt, name) if self.prefetch else ckpt.read(name)

    def stored(self, name: str) -> TensorReader | None:
        """The reader that hands out ``name`` as stored (vocabulary readers may not)."""
        return self

    def __call__(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        return self.upcast(self.raw(ckpt, name), ckpt.label, name)

    def upcast(self, raw: torch.Tensor, label: str, name: str) -> torch.Tensor:
        t = raw.to(device=self.device, dtype=self.dtype)
        check_finite(t, label, name)
        return t

    def delta(self, ckpt: Checkpoint, name: str, base: torch.Tensor,
              over: tuple[Checkpoint, str] | None = None) -> torch.Tensor:
        """``ckpt``'s task vector at ``name``; ``over``: the (checkpoint, name) ``base`` was
        read from, so that a checkpoint storing the task vector itself (a LoRA adapter on that
        base) gives it exactly (``Checkpoint.delta_over``)."""
        if over is not None and over[1] == name:
            stored = ckpt.delta_over(over[0], name, self.dtype, self.device)
            if stored is not None:
                check_finite(stored, ckpt.label, name)
                return stored
        return self.delta_of(self.raw(ckpt, name), ckpt.label, name, base)

    def delta_of(self, raw: torch.Tensor, label: str, name: str, base: torch.Tensor
                 ) -> torch.Tensor:
        """``upcast(raw) - base`` in one full-size buffer: a narrower stored dtype (bf16 under
        float32 compute) converts exactly, so the values are those of the promoted subtraction
        (whose mixed-dtype kernel is ~2x slower than a cast and a float32 one); the finite
        check runs on the task vector, and only when it fails on the input (a finite input
        whose task vector overflows passes, as before)."""
        raw = raw.to(device=self.device)
        if torch.promote_types(raw.dtype, self.dtype) != self.dtype or raw.dtype == torch.bool:
            upcast = raw.to(dtype=self.dtype)  # a new tensor: the dtypes differ
            check_finite(upcast, label, name)
            return upcast.sub_(base)
        if raw.dtype != self.dtype:
            delta = raw.to(dtype=self.dtype).sub_(base)
        else:  # never in place: raw may be the caller's own tensor
            delta = torch.sub(raw, base)
        if not all_finite(delta):
            check_finite(raw, label, name)
        return delta


class VocabReader:
    """A ``TensorReader`` that hands out vocabulary tensors (embeddings, head) with their rows
    aligned to the output vocabulary: all inputs of such a tensor are read and aligned together
    (a missing token's row depends on which models have it) and kept for that tensor only."""

    def __init__(self, read: TensorReader, alignment: Alignment, inputs: Sequence[Checkpoint],
                 names: set[str]):
        self.read, self.alignment, self.names = read, alignment, names
        self.inputs = list(inputs)
        self.device, self.dtype = read.device, read.dtype
        self._name: str | None = None
        self._aligned: list[torch.Tensor] = []

    def stored(self, name: str) -> TensorReader | None:
        """The plain reader when ``name`` is read as stored, None when it is vocabulary-aligned."""
        return None if name in self.names else self.read

    def __call__(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        if name not in self.names:
            return self.read(ckpt, name)
        if self._name != name:
            self._aligned = []  # free the previous tensor's rows first
            self._aligned = self.alignment.align([self.read(c, name) for c in self.inputs])
            self._name = name
        return self._aligned[next(i for i, c in enumerate(self.inputs) if c is ckpt)]

    def delta(self, ckpt: Checkpoint, name: str, base: torch.Tensor,
              over: tuple[Checkpoint, str] | None = None) -> torch.Tensor:
        if name not in self.names:
            return self.read.delta(ckpt, name, base, over)
        return self(ckpt, name) - base


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
        self.compute_dtype = FLOAT_DTYPES[recipe.dtype or DEFAULT_COMPUTE_DTYPE]
        self.load = TensorReader(device, self.compute_dtype)
        self.device = self.load.device
        self.slots = [ModelSlot(m.index, m.task, ckpt, m.step)
                      for m, ckpt in zip(self.params.models, models, strict=True)]
        # the method's inputs, in order (a slerp-like method's base is its first end point)
        self.weight_inputs: list[Checkpoint] = ([base] if self.params.base_first and base
                                                else []) + list(models)
        self.reference = base if base is not None else models[0]
        # written in out_dtype, else in an explicit dtype (mergekit: the computed tensors are
        # written as they are), else in the base's dtype tensor by tensor
        written = recipe.out_dtype or recipe.dtype
        out = FLOAT_DTYPES[written] if written else None
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
                                          else plan_tensors(self.reference, list(models), out,
                                                            vocab_plan))
        if check_filters:
            check_filters_match([self])
        self.features: list[FeatureStats] | None = None
        if features is not None:
            self.set_features(features)

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
        return summarize(self.tensors, len(self.slots), n_inputs, self.compute_dtype, passes)

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
