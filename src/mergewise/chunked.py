"""Elementwise merges of large CPU tensors, chunk by chunk, in cache.

A method whose entry i depends only on entry i of its inputs (``MergeMethod.elementwise``:
linear, task arithmetic, the TIES, DARE and breadcrumbs families) gives the same bits on any
split of the tensor. On whole tensors each of its ten or so steps streams full-size float32
buffers through memory; on chunks of 2^18 entries the buffers stay in cache, and the result is
written once, straight into the dtype it is stored in.

Task vectors are never whole when their sparsification allows it: one that is kept as it is
(no sparsifier, density 1) is upcast and subtracted chunk by chunk; a top-k one (TIES'
magnitude, breadcrumbs, TADrop's magnitude mode at the stats pass' rate) first streams its
|tau| through ``streamselect`` for the exact keep rule, then applies it chunk by chunk (TADrop's
L2 rescale also needs ||kept||, see ``TADropStep``); DARE's random one draws its mask and L1
sums chunk by chunk in that pass. The others (TADrop's random mode, global scope...) are
sparsified whole, as before, and sliced.

Chunks are merged on every core (``chunkpool``: threads, torch on one intra-op thread each),
each chunk's report figures added in chunk order, so the bits do not depend on the thread
count; the selection pass runs one model per thread, in chunk order within each. Only these
loops run so; a task vector made whole keeps torch's own threads.

Everything the whole-tensor path reports and decides is the same: norms from the same partial
sums (``ReportNorm``), kept counts, the all-zero rule (the base written bit for bit). Any NaN or
Inf seen on the way hands the tensor back to the whole-tensor path (``merge`` returns None),
which raises exactly its own error, naming the same input, or merges an overflow it lets pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .chunkpool import cores, each, ordered
from .numerics import REPORT_CHUNK, ReportNorm, all_finite, report_norm

if TYPE_CHECKING:
    from .engine import MergeJob, ModelSlot
    from .params import SparsifyStep
    from .plan import TensorPlan
    from .readers import TensorReader

CHUNK = REPORT_CHUNK  # a multiple of REPORT_CHUNK: report norms sum the same partials
MIN_NUMEL = 2 * CHUNK  # smaller tensors gain nothing


def chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def applies(job: MergeJob, plan: TensorPlan) -> bool:
    """Whether ``plan`` is merged here: an elementwise method, a large CPU tensor, a float32
    (or half-precision) computation, and inputs read as stored (not vocabulary-aligned)."""
    if not (job.method.elementwise and plan.merged and plan.numel >= MIN_NUMEL):
        return False
    if job.device.type != "cpu" or job.compute_dtype == torch.float64:
        return False
    if job.load.stored(plan.name) is None:
        return False
    if job.method.space == "delta" and any(  # a stored task vector (LoRA) is taken whole
            s.ckpt.holds_delta(job.base, n) for s, n in zip(job.slots, job.sources(plan),
                                                            strict=True)):
        return False
    return job.method.space == "weight" or job.base is not None


def merge(job: MergeJob, plan: TensorPlan, params: dict[str, Any],
          record: dict[str, Any] | None) -> torch.Tensor | None:
    """The merged tensor in ``plan.out_dtype`` (CPU), or None to take the whole-tensor path."""
    read = job.load.stored(plan.name)
    assert read is not None, "applies() admits only tensors read as stored"
    if job.method.space == "weight":
        return _merge_weights(job, plan, params, read)
    return _merge_deltas(job, plan, params, record, read)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _store(target: torch.Tensor, merged: torch.Tensor) -> bool:
    """Write one chunk in the stored dtype; False when what is written is not finite."""
    target.copy_(merged.reshape(-1))
    return all_finite(target)


def _nonzero(t: torch.Tensor) -> int:
    """``count_nonzero`` of a flat CPU chunk (NaN counts, +-0 does not), fast: numpy has no
    bfloat16 and emulates float16, so half precision is counted on its bits (only +-0 has no
    bit but the sign); a float array is compared first (numpy counts a bool array ~5x faster
    than a float one; torch's count_nonzero is slower still)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return int(np.count_nonzero(t.view(torch.int16).numpy() << 1))
    a = t.numpy()
    return int(np.count_nonzero(a != 0 if a.dtype.kind == "f" else a))


def _merge_weights(job: MergeJob, plan: TensorPlan, params: dict[str, Any],
                   read: TensorReader) -> torch.Tensor | None:
    sources = job.sources(plan)
    names = ([plan.base_name] if job.params.base_first else []) + sources
    raws = [_flat(read.raw(c, n)) for c, n in zip(job.weight_inputs, names, strict=True)]
    base = (_flat(read.raw(job.base, plan.base_name))
            if job.method.uses_base and job.base is not None else None)
    weights = job.params.weights(sources, plan.t)
    out = torch.empty(plan.numel, dtype=plan.out_dtype)

    def one(part: slice) -> bool:
        inputs = [r[part].to(job.compute_dtype) for r in raws]
        base_part = base[part].to(job.compute_dtype) if base is not None else None
        if not all(all_finite(t) for t in inputs) or (base_part is not None
                                                      and not all_finite(base_part)):
            return False
        return _store(out[part], job.method.func(base_part, inputs, weights, **params))

    with cores():
        if not all(ordered(one, chunks(plan.numel))):
            return None
    return out.reshape(plan.shape)


class _Figures(NamedTuple):
    """One chunk's report figures of one model, added in chunk order (``_Source.commit``)."""

    before: list[float]
    after: list[float]
    kept: int


class _Source:
    """One model's task vector, chunk by chunk from its raw input (kept as it is, or through a
    streamed sparsification), with the whole-tensor path's report figures."""

    def __init__(self, raw: torch.Tensor, dtype: torch.dtype, step: Any = None):
        self.raw, self.dtype, self.step = _flat(raw), dtype, step
        self.before, self.after = ReportNorm(), ReportNorm()
        self.kept = 0

    def delta(self, part: slice, base: torch.Tensor) -> torch.Tensor:
        raw = self.raw[part]
        return raw.to(self.dtype).sub_(base) if raw.dtype != self.dtype else torch.sub(raw, base)

    def chunk(self, part: slice, base: torch.Tensor, record: bool
              ) -> tuple[torch.Tensor | None, _Figures | None]:
        """This chunk of the (sparsified) task vector (None when it is not finite) and, when
        recording, its report figures; touches no state (chunks run on several threads)."""
        delta = self.delta(part, base)
        if not all_finite(delta):
            return None, None
        before = ReportNorm.partials(delta) if record else []
        kept = delta if self.step is None else self.step.apply(delta, delta.abs(), part)
        if not record:
            return kept, None
        after = ReportNorm.partials(kept) if self.step is not None else []
        return kept, _Figures(before, after, _nonzero(kept))

    def commit(self, figures: _Figures | None) -> None:
        """Add one chunk's figures (in chunk order)."""
        if figures is not None:
            self.before.extend(figures.before)
            self.after.extend(figures.after)
            self.kept += figures.kept

    def moved(self, kept: torch.Tensor, figures: _Figures | None) -> bool:
        return figures.kept > 0 if figures is not None else bool(kept.any())

    def info(self) -> dict[str, Any]:
        after = self.before if self.step is None else self.after
        report = getattr(self.step, "report", None)  # a sparsifier's own figures (TADrop's)
        return {"norm_before": self.before.value, **(report() if report else {}),
                "kept": self.kept, "norm_after": after.value}


class _Whole(_Source):
    """A task vector sparsified whole, as before (its selection needs the whole tensor)."""

    def __init__(self, job: MergeJob, plan: TensorPlan, slot: ModelSlot, source: str,
                 raw: torch.Tensor):
        super().__init__(raw, job.compute_dtype)
        self.job, self.plan, self.slot, self.source = job, plan, slot, source
        self.tensor: torch.Tensor | None = None
        self.record: dict[str, Any] = {}

    def make(self, base: torch.Tensor, record: bool) -> bool:
        """Sparsify the whole task vector (``base``: the whole base); False if not finite."""
        raw = self.raw.reshape(base.shape)
        delta = raw.to(base.dtype).sub_(base) if raw.dtype != base.dtype else torch.sub(raw, base)
        if not all_finite(delta):
            return False
        info: dict[str, Any] | None = {} if record else None
        if info is not None:
            info["norm_before"] = report_norm(delta)
        kept = self.job._sparsify(self.slot, self.plan, self.source, delta, info)
        if info is not None:
            info["kept"] = int(torch.count_nonzero(kept))
            info["norm_after"] = info["norm_before"] if kept is delta else report_norm(kept)
            self.record = info
        self.tensor = _flat(kept)
        self.any = bool(kept.any())
        return True

    def chunk(self, part: slice, base: torch.Tensor, record: bool
              ) -> tuple[torch.Tensor | None, _Figures | None]:
        assert self.tensor is not None
        return self.tensor[part], None

    def moved(self, kept: torch.Tensor, figures: _Figures | None) -> bool:
        return self.any

    def info(self) -> dict[str, Any]:
        return self.record


def _keeps_all(step: SparsifyStep, source: str, plan: TensorPlan) -> bool:
    keeps = step.sparsifier.keeps_all
    return keeps is not None and bool(keeps(**step.params(source, plan.t)))


def _strided(raw: torch.Tensor, base: torch.Tensor, step: int, dtype: torch.dtype
             ) -> torch.Tensor:
    """|tau|[::step], the same values as the whole tensor's."""
    return (raw[::step].to(dtype) - base[::step].to(dtype)).abs_()


def _sources(job: MergeJob, plan: TensorPlan, read: TensorReader, base: torch.Tensor
             ) -> list[_Source]:
    """Each model's task vector: streamed where its sparsification allows, else whole."""
    out: list[_Source] = []
    dtype = job.compute_dtype
    for slot, source in zip(job.slots, job.sources(plan), strict=True):
        raw = _flat(read.raw(slot.ckpt, source))
        step = slot.step
        if step is None or _keeps_all(step, source, plan):
            out.append(_Source(raw, dtype))
            continue
        streamed = step.sparsifier.streamed
        stats = slot.stats.for_tensor(plan.name) if slot.stats is not None else None
        band = (streamed(plan.numel, lambda s, r=raw: _strided(r, base, s, dtype),
                         generator=job.generator_for(slot, plan), stats=stats,
                         **step.params(source, plan.t))
                if streamed is not None else None)
        out.append(_Source(raw, dtype, band) if band is not None
                   else _Whole(job, plan, slot, source, raw))
    return out


def _select(job: MergeJob, plan: TensorPlan, sources: list[_Source], base: torch.Tensor
            ) -> None:
    """The streamed sparsifications' selection pass over |tau|; a bracket that missed makes
    that task vector whole."""
    streamed = [s for s in sources if s.step is not None]
    if not streamed:
        return
    dtype = job.compute_dtype

    def select(src: _Source) -> bool:  # one model per thread, its chunks in order
        for part in chunks(plan.numel):
            src.step.feed(part, src.delta(part, base[part].to(dtype)).abs_())
        return bool(src.step.ready(lambda part: src.delta(part, base[part].to(dtype)).abs_()))

    with cores():
        found = dict(zip(map(id, streamed), each(select, streamed), strict=True))
    for i, src in enumerate(sources):
        if src.step is not None and not found[id(src)]:
            slot = job.slots[i]
            sources[i] = _Whole(job, plan, slot, job.sources(plan)[i], src.raw)


def _merge_deltas(job: MergeJob, plan: TensorPlan, params: dict[str, Any],
                  record: dict[str, Any] | None, read: TensorReader) -> torch.Tensor | None:
    assert job.base is not None
    dtype = job.compute_dtype
    base_raw = read.raw(job.base, plan.base_name)
    base = _flat(base_raw)
    sources = _sources(job, plan, read, base)
    _select(job, plan, sources, base)
    wanted = record is not None
    whole = [s for s in sources if isinstance(s, _Whole)]
    if whole:
        base_whole = base_raw.to(dtype)
        if not all_finite(base_whole) or not all(s.make(base_whole, wanted) for s in whole):
            return None
        del base_whole
    weights = job.params.weights(job.sources(plan), plan.t)
    merged_norm = ReportNorm()
    out = torch.empty(plan.numel, dtype=plan.out_dtype)

    def one(part: slice) -> tuple[list[_Figures | None], list[float], bool] | None:
        b = base[part].to(dtype)
        if not all_finite(b):
            return None
        deltas, figures, moved = [], [], False
        for src in sources:
            kept, fig = src.chunk(part, b, wanted)
            if kept is None:
                return None
            moved = moved or src.moved(kept, fig)
            deltas.append(kept)
            figures.append(fig)
        merged = job.method.func(b, deltas, weights, **params)
        norm = ReportNorm.partials(merged.reshape(-1), b) if wanted else []
        return (figures, norm, moved) if _store(out[part], merged) else None

    moved = False
    with cores():
        for done in ordered(one, chunks(plan.numel)):
            if done is None:
                return None
            figures, norm, chunk_moved = done
            for src, fig in zip(sources, figures, strict=True):
                src.commit(fig)
            merged_norm.extend(norm)
            moved = moved or chunk_moved
    if record is not None:
        record["models"] = [s.info() for s in sources]
        record["merged_delta_norm"] = merged_norm.value if moved else 0.0
    if not moved:  # nothing moved: the base exactly, as the whole-tensor path writes it
        stored = base_raw.to(plan.out_dtype, copy=True)
        return stored.reshape(plan.shape) if all_finite(stored) else None
    return out.reshape(plan.shape)

