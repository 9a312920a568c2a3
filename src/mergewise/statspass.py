"""The stats pass: per-model statistics over the whole model, gathered before the merge pass.

Methods and sparsifiers that need global information (global TIES top-k, TADrop's budget) return
a ``StatsPass`` for each model. ``run_stats_pass`` streams every tensor's task vector through
``observe`` once per declared pass and calls ``end_pass`` after each; the merge pass then hands
``for_tensor(name)`` to the sparsifier as its ``stats`` argument. Only small per-tensor results
are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .chunkpool import cores, each

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .plan import TensorPlan

# (checkpoint, tensor name) -> the tensor on the compute device in the compute dtype
Reader = Callable[["Checkpoint", str], "torch.Tensor"]
Progress = Callable[[str, int], None]


class StatsPass:
    passes: int = 1

    def observe(self, pass_index: int, name: str, delta: torch.Tensor,
                params: dict[str, Any]) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called after every tensor was observed in ``pass_index``."""

    def for_tensor(self, name: str) -> Any:
        raise NotImplementedError

    # A pass whose per-tensor observation is a small value determined by the task vector alone
    # (and a few settings) may be cached across runs: ``cache_tag`` names those settings (None:
    # not cacheable), ``observed`` gives the value after ``observe``, ``observe_cached`` takes
    # it instead of the task vector.
    def cache_tag(self, params: dict[str, Any]) -> str | None:
        return None

    def observed(self, name: str) -> Any:
        raise NotImplementedError

    def observe_cached(self, pass_index: int, name: str, value: Any, numel: int,
                       params: dict[str, Any]) -> None:
        raise NotImplementedError

    def cached_ok(self, value: Any) -> bool:
        """Whether a cached value has the type ``observe_cached`` takes (default: a finite
        number or None), so a hand-edited cache can never reach the stats' arithmetic."""
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                                 and math.isfinite(value))


UNCACHED = object()  # what ``observed`` returns for an observation that must not be cached
log = logging.getLogger("mergewise.stats_cache")


class StatsCache:
    """Per-tensor statistics of earlier runs in ``DIR/stats-cache.json``, keyed by the stats'
    settings, the compute dtype and the identities of the base and model tensors (file,
    mtime, header entry, sampled bytes; see ``Checkpoint.identity``), so a sweep over TADrop's
    drop rate or strength reads and ranks each task vector once. Written atomically at the end
    of a stats pass.

    A cache must never change a result nor break a run: each entry carries a check (a hash of
    its key and value), and an unreadable, garbled or truncated file, an entry that fails its
    check or holds a value of the wrong type are ignored and recomputed, with one warning line
    per cache (logger ``mergewise.stats_cache``); so is a cache that cannot be written.
    """

    FILE = "stats-cache.json"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.FILE
        self.entries: dict[str, Any] = {}
        self.changed = False
        self._warned = False
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            self.warn(f"cannot be read ({getattr(exc, 'strerror', None) or exc})")
            return
        try:
            entries = json.loads(text)
        except ValueError:
            self.warn("is not valid JSON (truncated or garbled)")
            return
        if not isinstance(entries, dict):
            self.warn(f"holds a JSON {type(entries).__name__}, not an object")
            return
        self.entries = entries

    def warn(self, problem: str) -> None:
        """One warning line per cache, whatever goes wrong with it."""
        if not self._warned:
            self._warned = True
            log.warning("warning: stats cache %s %s; ignored, the statistics are recomputed "
                        "(the merge is unchanged)", self.path, problem)

    @staticmethod
    def key(*parts: object) -> str:
        return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()

    @staticmethod
    def check(key: str, value: Any) -> str:
        return hashlib.sha256(json.dumps([key, value]).encode()).hexdigest()[:16]

    def get(self, key: str, valid: Callable[[Any], bool] = lambda v: True) -> Any:
        """The entry ``{"value": v, "check": ...}`` of ``key``, or None: absent, or corrupt
        (failed check, wrong shape, ``valid(v)`` false), then dropped, to be recomputed."""
        hit = self.entries.get(key)
        if hit is None:
            return None
        if (isinstance(hit, dict) and set(hit) == {"value", "check"}
                and hit["check"] == self.check(key, hit["value"]) and valid(hit["value"])):
            return hit
        del self.entries[key]
        self.changed = True
        self.warn("has corrupt entries")
        return None

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = {**value, "check": self.check(key, value["value"])}
        self.changed = True

    def save(self) -> None:
        if self.changed:
            from .writer import atomic_file

            try:
                with atomic_file(self.path) as tmp:
                    tmp.write_text(json.dumps(self.entries))
            except OSError as exc:
                self.warn(f"cannot be written ({exc.strerror or exc})")
            self.changed = False


@dataclass
class Observer:
    """One model's stats pass: its checkpoint, the pass, its parameters per output tensor and,
    for a frankenmerge, the name it reads for an output tensor (default: the same name)."""

    ckpt: Checkpoint
    stats: StatsPass
    params: Callable[[TensorPlan], dict[str, Any]]
    source: Callable[[TensorPlan], str] = lambda plan: plan.name


Reads = list[tuple["Checkpoint", str]]


def _cache_key(cache: StatsCache | None, o: Observer, base: Checkpoint, plan: TensorPlan,
               params: dict[str, Any], dtype: object) -> str | None:
    tag = o.stats.cache_tag(params) if cache is not None else None
    if tag is None:
        return None
    ids = (base.identity(plan.base_name), o.ckpt.identity(o.source(plan)))
    return None if None in ids else StatsCache.key(tag, dtype, *ids)


def run_stats_pass(read: Reader, base: Checkpoint, observers: Sequence[Observer],
                   tensors: Sequence[TensorPlan], progress: Progress | None = None,
                   ahead: Callable[[Reads], None] | None = None,
                   cache: StatsCache | None = None, dtype: object = "") -> None:
    """Stream the task vector (model - base) of every merged tensor through each observer, once
    per pass it declares; the base tensor is read once per tensor and pass, and not at all
    when every observer finds the tensor in ``cache``. ``ahead(reads)`` is told what the next
    tensor will read, so it can be read while this one is observed."""
    if not observers:
        return
    passes = max(o.stats.passes for o in observers)
    merged = [t for t in tensors if t.merged]

    def todo(p: int, plan: TensorPlan) -> list[tuple[Observer, dict[str, Any], str | None]]:
        out = []
        for o in observers:
            if p < o.stats.passes:
                params = o.params(plan)
                key = _cache_key(cache, o, base, plan, params, dtype) if p == 0 else None
                out.append((o, params, key))
        return out

    for p in range(passes):
        work = [todo(p, plan) for plan in merged]
        for j, plan in enumerate(merged):
            if ahead is not None and j + 1 < len(merged):
                misses = [(o.ckpt, o.source(merged[j + 1])) for o, _, key in work[j + 1]
                          if key is None or cache.get(  # type: ignore[union-attr]
                              key, o.stats.cached_ok) is None]
                ahead([(base, merged[j + 1].base_name), *misses] if misses else [])
            _observe(read, base, plan, p, work[j], cache)
            if progress is not None:
                progress(plan.name, plan.numel * plan.in_dtype.itemsize * (len(observers) + 1))
        for o in observers:
            if p < o.stats.passes:
                o.stats.end_pass(p)
    if cache is not None:
        cache.save()


# Task vectors up to this size are observed one model per core (``chunkpool``); larger ones
# (embeddings, heads) one model at a time on torch's own threads, so the per-thread scratch
# buffers of the observers (|tau|, a float64 copy) stay a few MB and the stats pass's peak
# memory is that of one observer on the largest tensor, as before.
PARALLEL_MAX = 1 << 23


def _parallel(read: Reader, plan: TensorPlan, misses: list[Any]) -> bool:
    """Whether the models' observations of ``plan`` may run on several threads: more than one
    to compute, each observer its own pass, and a reader that hands out each model's tensor on
    its own (a ``VocabReader`` aligns all the models of a tensor together, in one thread)."""
    from .readers import TensorReader

    return (len(misses) > 1 and plan.numel <= PARALLEL_MAX and type(read) is TensorReader
            and len({id(o.stats) for o, _, _ in misses}) == len(misses))


def _observe(read: Reader, base: Checkpoint, plan: TensorPlan, p: int,
             work: list[tuple[Observer, dict[str, Any], str | None]],
             cache: StatsCache | None) -> None:
    """One tensor of one pass: cached observations, else the task vectors from the files,
    one model per core where that is safe (``_parallel``). Every observation is a function of
    its task vector alone, computed with kernels whose bits do not depend on the thread count
    (elementwise ops, numpy's partition, torch's float64 norm; checked in the tests), so the
    statistics are the same bits either way; cache entries are written in model order."""
    misses = []
    for o, params, key in work:
        hit = (cache.get(key, o.stats.cached_ok) if cache is not None and key is not None
               else None)
        if hit is not None:
            o.stats.observe_cached(p, plan.name, hit["value"], plan.numel, params)
        else:
            misses.append((o, params, key))
    if not misses:
        return
    base_tensor = read(base, plan.base_name)

    def one(item: tuple[Observer, dict[str, Any], str | None]) -> None:
        o, params, _ = item
        delta = (read.delta(o.ckpt, o.source(plan), base_tensor,  # type: ignore[attr-defined]
                            (base, plan.base_name))
                 if hasattr(read, "delta") else read(o.ckpt, o.source(plan)) - base_tensor)
        o.stats.observe(p, plan.name, delta, params)

    if _parallel(read, plan, misses):
        with cores():
            each(one, misses)
    else:
        for item in misses:
            one(item)
    for o, _, key in misses:
        value = o.stats.observed(plan.name) if cache is not None and key is not None else UNCACHED
        if value is not UNCACHED and o.stats.cached_ok(value):
            cache.put(key, {"value": value})  # type: ignore[union-attr,arg-type]
