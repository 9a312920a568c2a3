"""The merge loop: plan -> (stats pass) -> merge pass, one tensor at a time.

Plan: open every checkpoint lazily and check names, shapes and dtypes of every tensor against
the reference (the base, or the first model when the method needs no base) before computing
anything; every mismatch is reported at once. Stats pass (only when a sparsifier asks, e.g.
global TIES): stream each task vector through the sparsifier's ``StatsPass``. Merge pass: per
tensor, load the base and the K inputs, upcast to ``dtype`` on ``device``, form task vectors,
sparsify each with its own seeded generator, call the method, check the result is finite, cast
to the output dtype and hand it to a sink (the streaming writer, or a dict for the Python API).
At most K + 2 copies of one tensor (plus the method's work space) are alive at a time.

Tensor rules: floating-point tensors are merged. Integer and bool buffers (``position_ids``...)
are copied from the reference unchanged and may be absent from experts. A floating-point tensor
missing from an expert, present only in an expert, of another shape, or of a non-float dtype
there is an error. A tensor whose (sparsified) task vectors are all zero is written as the base
tensor itself, bit for bit (cast only to ``out_dtype``), by every task-vector method.

Task-specific methods (EMR) return the unified tensor plus per-task modulators; ``run`` hands
the modulators of every merged tensor (None for an all-zero one) to a ``modulator_sink`` and
refuses to run without one, since the unified tensor alone is no task's model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import (
    CheckpointError,
    FeatureError,
    MergewiseError,
    NonFiniteError,
    RecipeError,
    ShapeMismatchError,
)
from .features.statsfile import FeatureStats
from .numerics import Float64Norm, all_finite, check_finite
from .recipe import Recipe, resolve, sparsifier_for, sparsifier_param_specs
from .registry import Param, Sparsifier
from .rng import tensor_generator
from .statspass import StatsPass
from .tensors import FLOAT_DTYPES, dtype_name

MAX_LISTED = 8
# (tensor name, base in the compute dtype, stored output tensor, the method's modulators or None)
ModulatorSink = Callable[[str, "torch.Tensor | None", torch.Tensor, Any], None]


@dataclass
class ModelSlot:
    """One input model with its resolved sparsification step."""

    index: int
    task: str
    ckpt: Checkpoint
    sparsifier: Sparsifier | None = None
    sparsifier_params: dict[str, Any] = field(default_factory=dict)
    sparsifier_specs: dict[str, Param] = field(default_factory=dict)
    from_block: bool = False
    stats: StatsPass | None = None


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    merged: bool  # False: copied from the reference (integer/bool buffers)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class PlanSummary:
    tensors: int
    merged: int
    copied: int
    parameters: int
    bytes_read: int
    bytes_written: int
    largest_tensor: str
    peak_bytes_estimate: int
    stats_passes: int

    def lines(self) -> list[str]:
        gb = 1e9
        return [
            f"tensors: {self.tensors} ({self.merged} merged, {self.copied} copied from the base)",
            f"parameters: {self.parameters:,}",
            f"read: {self.bytes_read / gb:.3f} GB, write: {self.bytes_written / gb:.3f} GB",
            f"largest tensor: {self.largest_tensor}",
            f"estimated peak working memory: {self.peak_bytes_estimate / gb:.3f} GB "
            "(K+4 copies of the largest tensor in the compute dtype)",
            f"passes over the inputs: {1 + self.stats_passes} "
            f"({self.stats_passes} stats pass(es) + merge)",
        ]


class MergeJob:
    """A validated recipe bound to open checkpoints: plan, then run into a sink."""

    def __init__(self, recipe: Recipe, base: Checkpoint | None, models: Sequence[Checkpoint],
                 device: str = "cpu", features: Sequence[FeatureStats] | None = None):
        self.recipe = recipe
        self.method = recipe.method
        self.base = base
        self.compute_dtype = FLOAT_DTYPES[recipe.dtype]
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergewiseError("--device cuda was asked for, but torch sees no CUDA device; "
                                 "use --device cpu")
        self.slots: list[ModelSlot] = []
        for i, ckpt in enumerate(models):
            entry = recipe.models[i]
            slot = ModelSlot(i, entry.task_name, ckpt)
            sp, block_params, from_block = sparsifier_for(recipe, i)
            if sp is not None:
                slot.sparsifier = sp
                slot.sparsifier_params = block_params
                slot.sparsifier_specs = sparsifier_param_specs(self.method, sp, from_block)
                slot.from_block = from_block
            self.slots.append(slot)
        # slerp-style methods with a base and one model: the base is the first end point
        self.weight_inputs: list[Checkpoint] = [s.ckpt for s in self.slots]
        if (self.method.space == "weight" and base is not None and self.method.max_models == 2
                and len(models) == 1):
            self.weight_inputs = [base, *self.weight_inputs]
        self.reference = base if (base is not None) else models[0]
        self.tensors = self._plan()
        self.features: list[FeatureStats] | None = None
        if features is not None:
            self.set_features(features)

    # --- planning -----------------------------------------------------------------------
    def _plan(self) -> list[TensorPlan]:
        ref = self.reference
        self._check_configs()
        ref_infos = {n: ref.info(n) for n in ref.names()}
        problems: list[str] = []
        others = [s.ckpt for s in self.slots if s.ckpt is not ref]
        for ckpt in others:
            names = set(ckpt.names())
            for name, info in ref_infos.items():
                if name not in names:
                    if info.is_float:
                        problems.append(f"{ckpt.label}: missing tensor '{name}'")
                    continue
                other = ckpt.info(name)
                if other.shape != info.shape:
                    problems.append(f"{ckpt.label}: tensor '{name}' has shape {list(other.shape)}, "
                                    f"{ref.label} has {list(info.shape)}")
                elif other.is_float != info.is_float:
                    problems.append(f"{ckpt.label}: tensor '{name}' is {other.dtype}, "
                                    f"{ref.label} has {info.dtype}")
            for name in names - set(ref_infos):
                if ckpt.info(name).is_float:
                    problems.append(f"{ckpt.label}: extra tensor '{name}' not in {ref.label}")
        if problems:
            shown = "; ".join(problems[:MAX_LISTED])
            more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
            raise ShapeMismatchError(
                f"{len(problems)} mismatch(es) between the models and the base: {shown}{more} "
                "(all models must share the base's architecture)")
        out_override = FLOAT_DTYPES[self.recipe.out_dtype] if self.recipe.out_dtype else None
        plans = []
        for name, info in ref_infos.items():
            out = (out_override or info.dtype) if info.is_float else info.dtype
            plans.append(TensorPlan(name, info.shape, info.dtype, out, info.is_float))
        if not any(p.merged for p in plans):
            raise CheckpointError(f"{ref.label}: no floating-point tensors to merge")
        return plans

    def _check_configs(self) -> None:
        ckpts = ([self.base] if self.base is not None else []) + [s.ckpt for s in self.slots]
        seen: tuple[str, str] | None = None
        for ckpt in ckpts:
            cfg = ckpt.config
            if cfg is None:
                continue
            if cfg.get("quantization_config"):
                raise CheckpointError(f"{ckpt.label}: is a quantized checkpoint "
                                      f"({cfg['quantization_config'].get('quant_method', '?')}); "
                                      "dequantize it to float16/bfloat16 first")
            arch = ",".join(cfg.get("architectures") or []) or str(cfg.get("model_type", "?"))
            if seen is None:
                seen = (arch, ckpt.label)
            elif arch != seen[0]:
                raise ShapeMismatchError(f"mixed architectures: {seen[1]} is {seen[0]} but "
                                         f"{ckpt.label} is {arch}; merge models of one base only")

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

    def summary(self) -> PlanSummary:
        merged = [t for t in self.tensors if t.merged]
        largest = max(merged, key=lambda t: t.numel)
        n_inputs = len(self.slots) + (1 if self.base is not None and self.method.space == "delta"
                                      else 0)
        bytes_read = sum(t.numel * t.in_dtype.itemsize for t in self.tensors) * n_inputs
        stats = [self._stats_for(s) for s in self.slots]
        passes = max((st.passes for st in stats if st is not None), default=0)
        return PlanSummary(
            tensors=len(self.tensors), merged=len(merged),
            copied=len(self.tensors) - len(merged),
            parameters=sum(t.numel for t in self.tensors),
            bytes_read=bytes_read,
            bytes_written=sum(t.numel * t.out_dtype.itemsize for t in self.tensors),
            largest_tensor=f"{largest.name} {list(largest.shape)}",
            peak_bytes_estimate=largest.numel * self.compute_dtype.itemsize * (len(self.slots) + 4),
            stats_passes=passes,
        )

    # --- parameters ---------------------------------------------------------------------
    def method_params(self, name: str) -> dict[str, Any]:
        out = {}
        for p in self.method.params:
            value = resolve(self.recipe.parameters.get(p.name), name)
            out[p.python_name] = p.default if value is None else value
        return out

    def model_param(self, slot: ModelSlot, spec: Param, name: str) -> Any:
        entry = self.recipe.models[slot.index]
        for source in (entry.parameters, self.recipe.parameters):
            value = resolve(source.get(spec.name), name)
            if value is not None:
                return value
        return spec.default

    def sparsifier_params(self, slot: ModelSlot, name: str) -> dict[str, Any]:
        out = {}
        for key, spec in slot.sparsifier_specs.items():
            if slot.from_block:
                value = resolve(slot.sparsifier_params.get(key), name)
                out[spec.python_name] = spec.default if value is None else value
            else:
                out[spec.python_name] = self.model_param(slot, spec, name)
        return out

    def weights(self, name: str) -> list[float]:
        spec = next((p for p in self.method.model_params if p.name == "weight"), None)
        n = len(self.weight_inputs) if self.method.space == "weight" else len(self.slots)
        if spec is None:
            return [1.0] * n
        # a base prepended as the first end point of a two-model method weighs 1
        return [1.0] * (n - len(self.slots)) + [float(self.model_param(s, spec, name))
                                                for s in self.slots]

    def _stats_for(self, slot: ModelSlot) -> StatsPass | None:
        if slot.sparsifier is None or slot.sparsifier.stats is None:
            return None
        first = next(t.name for t in self.tensors if t.merged)
        return slot.sparsifier.stats(**self.sparsifier_params(slot, first))

    def sparsifier_summary(self) -> list[dict[str, Any]]:
        """Per model: sparsifier, its parameters and what its stats pass decided globally."""
        out = []
        for slot in self.slots:
            entry: dict[str, Any] = {"task": slot.task,
                                     "sparsifier": slot.sparsifier.name if slot.sparsifier else None}
            if slot.sparsifier is not None:
                first = next(t.name for t in self.tensors if t.merged)
                entry["parameters"] = self.sparsifier_params(slot, first)
            for attr in ("d_ref", "threshold"):
                value = getattr(slot.stats, attr, None)
                if value is not None:
                    entry[attr] = float(value)
            if hasattr(slot.stats, "realised_drop_rate"):
                entry["realised_drop_rate"] = slot.stats.realised_drop_rate()
            out.append(entry)
        return out

    # --- computing ----------------------------------------------------------------------
    def _load(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        """Read, move and upcast one tensor. May return the caller's own tensor (in-memory
        inputs already in the compute dtype): never modify the result in place."""
        t = ckpt.read(name)
        t = t.to(device=self.device, dtype=self.compute_dtype)
        check_finite(t, ckpt.label, name)
        return t

    def task_vectors(self, name: str, base: torch.Tensor,
                     record: dict[str, Any] | None = None,
                     stats_mode: bool = False) -> list[torch.Tensor]:
        """Sparsified task vectors of every model for tensor ``name`` (not sparsified when
        ``stats_mode``: the stats pass observes raw task vectors)."""
        deltas = []
        norm64 = Float64Norm()  # one float64 buffer for this tensor's report norms
        for slot in self.slots:
            delta = self._load(slot.ckpt, name) - base  # out of place: never touch inputs
            if stats_mode:
                deltas.append(delta)
                continue
            info: dict[str, Any] = {}
            if record is not None:
                info["norm_before"] = norm64(delta)
            if slot.sparsifier is not None:
                params = self.sparsifier_params(slot, name)
                gen = (tensor_generator(self.recipe.seed, slot.index, name)
                       if slot.sparsifier.random else None)
                stats = slot.stats.for_tensor(name) if slot.stats is not None else None
                if slot.sparsifier.reports and record is not None:
                    params["info"] = info
                delta = slot.sparsifier.func(delta, generator=gen, stats=stats, **params)
            if record is not None:
                info["kept"] = int(torch.count_nonzero(delta))
                info["norm_after"] = norm64(delta)
                record.setdefault("models", []).append(info)
            deltas.append(delta)
        return deltas

    def merge_tensor(self, plan: TensorPlan, record: dict[str, Any] | None = None,
                     modulator_sink: ModulatorSink | None = None) -> torch.Tensor:
        """The merged tensor in ``plan.out_dtype``; a task-specific method's per-task
        modulators go to ``modulator_sink`` (None when every task vector was zero)."""
        name = plan.name
        if not plan.merged:
            return self.reference.read(name).clone()
        params = self.method_params(name)
        weights = self.weights(name)
        modulators = base = None
        if self.method.features:
            if self.features is None:
                raise FeatureError(f"{self.method.name} needs calibration features for every "
                                   "model; none were given")
            params["features"] = [st.for_tensor(name, plan.shape) for st in self.features]
            params["name"] = name
            if record is not None:
                record["unit"] = next((f.kind for f in params["features"] if f is not None),
                                      "fallback")
        if self.method.space == "weight":
            inputs = [self._load(c, name) for c in self.weight_inputs]
            out = self.method.func(None, inputs, weights, **params)
        else:
            base = self._load(self.base, name)  # type: ignore[arg-type]
            deltas = self.task_vectors(name, base, record)
            if not any(bool(d.any()) for d in deltas):
                # nothing moved: the base exactly, not its round trip through the compute dtype;
                # a copy (never the caller's own tensor), checked against out_dtype below
                if record is not None:
                    record["merged_delta_norm"] = 0.0
                out = self.base.read(name).clone()  # type: ignore[union-attr]
            else:
                out = self.method.func(base, deltas, weights, **params)
                if self.method.task_specific:
                    out, modulators = out.merged, out.modulators
                if record is not None:
                    record["merged_delta_norm"] = float(torch.linalg.vector_norm(out - base))
            del deltas
            if modulator_sink is None:
                base = None  # free it before the cast (peak memory)
        if not all_finite(out):
            raise NonFiniteError(f"{self.method.name} produced NaN/Inf for tensor '{name}'; "
                                 "check the recipe's weights and lambda")
        out = out.to(dtype=plan.out_dtype)
        if not all_finite(out):  # finite in the compute dtype, not in out_dtype
            dtype = dtype_name(plan.out_dtype)
            raise NonFiniteError(f"{self.method.name}: tensor '{name}' overflows out_dtype {dtype} "
                                 "(values beyond its range); use a wider out_dtype or check the "
                                 "recipe's weights and lambda")
        out = out.cpu()
        if modulator_sink is not None:
            modulator_sink(name, base, out, modulators)
        return out

    def run_stats_pass(self, progress: Callable[[str, int], None] | None = None) -> None:
        for slot in self.slots:
            slot.stats = self._stats_for(slot)
        active = [s for s in self.slots if s.stats is not None]
        if not active or self.base is None:
            return
        passes = max(s.stats.passes for s in active)  # type: ignore[union-attr]
        merged = [t for t in self.tensors if t.merged]
        for p in range(passes):
            for plan in merged:
                base = self._load(self.base, plan.name)
                for slot in active:
                    if p >= slot.stats.passes:  # type: ignore[union-attr]
                        continue
                    delta = self._load(slot.ckpt, plan.name) - base
                    slot.stats.observe(p, plan.name, delta,  # type: ignore[union-attr]
                                       self.sparsifier_params(slot, plan.name))
                    del delta
                if progress is not None:
                    progress(plan.name, plan.numel * plan.in_dtype.itemsize * (len(active) + 1))
            for slot in active:
                if p < slot.stats.passes:  # type: ignore[union-attr]
                    slot.stats.end_pass(p)  # type: ignore[union-attr]

    def run(self, sink: Callable[[str, torch.Tensor], None],
            progress: Callable[[str, int], None] | None = None,
            stats_progress: Callable[[str, int], None] | None = None,
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
        self.run_stats_pass(stats_progress)
        n_inputs = (len(self.weight_inputs) if self.method.space == "weight"
                    else len(self.slots) + 1)
        records = []
        for plan in self.tensors:
            start = time.perf_counter()
            record: dict[str, Any] = {"name": plan.name, "shape": list(plan.shape),
                                      "numel": plan.numel, "merged": plan.merged}
            out = self.merge_tensor(plan, record, modulator_sink)
            sink(plan.name, out)
            record["seconds"] = round(time.perf_counter() - start, 6)
            records.append(record)
            if progress is not None:
                progress(plan.name, plan.numel * plan.in_dtype.itemsize * n_inputs)
        return records

