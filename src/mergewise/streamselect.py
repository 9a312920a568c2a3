"""Exact top-k of a tensor that is never whole: the keep set of ``selection.topk_mask``
(exactly k entries, ties at the k-th value going to the lowest flat indices) found from chunks.

That set is one rule on the values: keep v > T, and v == T at flat index < cut. T is found as
``selection`` finds it, from a bracket [lo, hi] taken from a strided sample: one pass counts the
values above hi and gathers those inside the bracket (a bracket of one value, such as the exact
zeros of untouched embedding rows, is only counted); T is then ranked among the gathered
values. When the ties at T are not all kept, the chunk holding the last kept one is recomputed
to find ``cut``. A bracket that misses T (about one tensor in 10^9) returns None and the caller
selects on the whole tensor. Any bracket gives the same rule, so the rule equals the whole
tensor's mask bit for bit; the tests check it against ``topk_mask``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SAMPLE = (1 << 10, 1 << 16)  # sample size bounds; 8 sqrt(n) in between (as selection)


def sample_step(n: int) -> int:
    lo_m, hi_m = SAMPLE
    return max(1, n // min(hi_m, max(lo_m, int(8 * math.sqrt(n)))))


@dataclass(frozen=True)
class KeepRule:
    """Keep v > threshold, and v == threshold at flat index < cut."""

    threshold: float
    cut: int

    def mask(self, values: torch.Tensor, part: slice, out: torch.Tensor) -> torch.Tensor:
        """The rule on one chunk as a float 0/1 tensor in ``out`` (which may be ``values``)."""
        start, stop = part.start, part.stop
        if stop <= self.cut:
            return torch.ge(values, self.threshold, out=out)
        if start >= self.cut:
            return torch.gt(values, self.threshold, out=out)
        split = self.cut - start
        torch.ge(values[:split], self.threshold, out=out[:split])
        torch.gt(values[split:], self.threshold, out=out[split:])
        return out


KEEP_ALL = KeepRule(-math.inf, 0)
KEEP_NONE = KeepRule(math.inf, 0)


class _Rank:
    """The search for one k: the bracket, the count above it, what is inside."""

    def __init__(self, n: int, k: int, ordered: torch.Tensor):
        self.k = k
        m = ordered.numel()
        r = n - k + 1  # rank of T from the smallest (1-based)
        centre = (r - 1) / max(1, n - 1) * (m - 1)
        margin = 3.0 * math.sqrt(m) + 2
        low, high = int(centre - margin), int(centre + margin) + 1
        # a bracket reaching the sample's end is open there: the extremes are never missed
        self.lo = float(ordered[low]) if low > 0 else 0.0
        self.hi = float(ordered[high]) if high < m - 1 else math.inf
        self.above = 0
        self.inside: list[tuple[slice, np.ndarray | int]] = []  # values, or a count if lo == hi
        self.zeros = 0  # exact zeros inside a bracket starting at 0 (counted, not gathered)

    def feed(self, part: slice, v: np.ndarray) -> None:
        lo, hi = np.float32(self.lo), np.float32(self.hi)
        above = int(np.count_nonzero(v > hi))
        self.above += above
        if self.lo == self.hi:
            self.inside.append((part, int(np.count_nonzero(v >= lo)) - above))
            return
        low = v > lo if self.lo == 0.0 else v >= lo
        if self.lo == 0.0:
            self.zeros += v.size - int(np.count_nonzero(low))
        low &= v <= hi
        self.inside.append((part, v[low]))

    def rule(self, n: int, values_at: Callable[[slice], np.ndarray]) -> KeepRule | None:
        need = self.k - self.above
        if self.lo == self.hi:
            ties = [(p, c) for p, c in self.inside]
            total = sum(c for _, c in ties)
            if not 0 < need <= total:
                return None
            return _with_cut(self.lo, need, total, ties, n, values_at)
        gathered = [v for _, v in self.inside]
        band = np.concatenate(gathered) if gathered else np.empty(0, np.float32)
        if need <= 0 or need > band.size + self.zeros:
            return None
        if need > band.size:  # T = 0: kept zeros change nothing (0 * tau = tau = +-0)
            return KeepRule(0.0, 0)
        t = np.partition(band, band.size - need)[band.size - need]
        ties_needed = need - int(np.count_nonzero(band > t))
        ties = [(p, int(np.count_nonzero(v == t))) for p, v in self.inside]
        return _with_cut(float(t), ties_needed, sum(c for _, c in ties), ties, n, values_at)


def _with_cut(t: float, needed: int, total: int, ties: Sequence[tuple[slice, int]], n: int,
              values_at: Callable[[slice], np.ndarray]) -> KeepRule:
    """The rule keeping the first ``needed`` of the ``total`` entries equal to T."""
    if t == 0.0:  # kept zeros change nothing; one convention, so breadcrumbs' band is 0/1
        return KeepRule(0.0, 0)
    if needed >= total:
        return KeepRule(t, n)
    before = 0
    for part, count in ties:
        if before + count >= needed:
            at = np.flatnonzero(values_at(part) == np.float32(t))[needed - before - 1]
            return KeepRule(t, part.start + int(at) + 1)
        before += count
    raise AssertionError("tie counts do not add up")  # pragma: no cover


def _numpy(values: torch.Tensor) -> np.ndarray:
    """float32 numpy values (half precision converts exactly; the order is the same)."""
    return (values if values.dtype == torch.float32 else values.float()).numpy()


class TopKSearch:
    """Exact top-k rules of one streamed tensor of ``n`` non-negative values, for several k at
    once: ``feed`` every chunk in order, then ``rules``."""

    def __init__(self, n: int, ks: Sequence[int], sample: torch.Tensor):
        self.n = n
        self.ks = list(ks)
        ordered = torch.sort(sample.reshape(-1).float()).values
        self.ranks = {k: _Rank(n, k, ordered) for k in set(self.ks) if 0 < k < n}

    def feed(self, part: slice, values: torch.Tensor) -> None:
        v = _numpy(values)
        for rank in self.ranks.values():
            rank.feed(part, v)

    def rules(self, values_at: Callable[[slice], torch.Tensor]) -> list[KeepRule] | None:
        """One rule per k, or None when a bracket missed (select on the whole tensor)."""
        found: dict[int, KeepRule] = {}
        for k, rank in self.ranks.items():
            rule = rank.rule(self.n, lambda part: _numpy(values_at(part)))
            if rule is None:
                return None
            found[k] = rule
        return [found.get(k, KEEP_ALL if k >= self.n else KEEP_NONE) for k in self.ks]


class BandStep:
    """A streamed sparsification: keep the top ``keep`` by |tau| minus the top ``drop``
    (magnitude: drop 0; breadcrumbs: the outliers), as ``keep_mask * tau``, the products the
    whole-tensor sparsifiers compute."""

    def __init__(self, n: int, sample_of: Callable[[int], torch.Tensor], keep: int,
                 drop: int = 0):
        step = sample_step(n)
        self.search = TopKSearch(n, [keep, drop] if drop else [keep], sample_of(step))
        self.rules: list[KeepRule] = []

    def feed(self, part: slice, magnitude: torch.Tensor) -> None:
        self.search.feed(part, magnitude)

    def ready(self, magnitude_at: Callable[[slice], torch.Tensor]) -> bool:
        rules = self.search.rules(magnitude_at)
        self.rules = rules or []
        return rules is not None

    def apply(self, delta: torch.Tensor, magnitude: torch.Tensor, part: slice) -> torch.Tensor:
        """The kept task vector of one chunk (``magnitude`` = |delta| is overwritten)."""
        if len(self.rules) == 1:
            return self.rules[0].mask(magnitude, part, out=magnitude).mul_(delta)
        keep = self.rules[0].mask(magnitude, part, out=torch.empty_like(magnitude))
        keep.sub_(self.rules[1].mask(magnitude, part, out=magnitude))  # drop inside keep: 0/1
        return keep.mul_(delta)
