"""Exact order statistics on tensors of any size: keep counts, top-k masks.

Top-k selections keep an exact count (round-half-up of density x numel, at least 1 when
density > 0) with ties broken by index (lower flat index wins), never by a ``>=`` threshold,
which keeps too many when values tie (common in bf16 and at exact zeros). ``kthvalue`` is used
instead of a full sort: it is a linear-time selection and has no size limit. On large CPU tensors
the selection first brackets the answer between two order statistics of a strided sample and runs
``kthvalue`` only on the few values inside the bracket (single-threaded ``kthvalue`` over a whole
32M-entry tensor takes most of a second); the result is the same value, and when the sample
misses, the whole tensor is searched as before. Quantiles of large CPU tensors (TADrop's stats
pass) are found the same way: a bracket per rank, the values below it counted, only the band
partitioned.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

SELECT_DIRECT = 1 << 18  # below this many entries, kthvalue over the whole tensor
SELECT_SAMPLE = (1 << 10, 1 << 16)  # sample size bounds; 8 sqrt(n) in between


def round_half_up(fraction: float, n: int) -> int:
    """round-half-up(fraction * n), exact in rational arithmetic (0.35 * 10 gives 4, not 3)."""
    if n <= 0 or fraction <= 0:
        return 0
    return min(n, int(Fraction(repr(float(fraction))) * n + Fraction(1, 2)))


def keep_count(fraction: float, n: int) -> int:
    """How many entries a top-k with this density keeps: round-half-up, at least 1 if > 0."""
    if n <= 0 or fraction <= 0:
        return 0
    return max(1, round_half_up(fraction, n))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest element (1-based) of a flat tensor, as a 0-d tensor."""
    n = values.numel()
    if n >= SELECT_DIRECT and values.device.type == "cpu" and values.is_floating_point():
        found = _bracketed_kthvalue(values, n - k + 1)
        if found is not None:
            return found
    return torch.kthvalue(values, n - k + 1).values


def _bracket(values: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two values of a strided sample that enclose rank ``r`` (1-based, from the smallest) of
    ``values`` with high probability; callers check that they do."""
    n = values.numel()
    lo_m, hi_m = SELECT_SAMPLE
    sample = values[:: max(1, n // min(hi_m, max(lo_m, int(8 * math.sqrt(n)))))]
    m = sample.numel()
    ordered = torch.sort(sample).values
    centre = (r - 1) / (n - 1) * (m - 1)  # where rank r is expected in the sample (0-based)
    margin = 3.0 * math.sqrt(m) + 2  # >= 6 binomial standard deviations
    return ordered[max(0, int(centre - margin))], ordered[min(m - 1, int(centre + margin) + 1)]


def _bracketed_kthvalue(values: torch.Tensor, r: int) -> torch.Tensor | None:
    """``kthvalue(values, r)`` via a bracket [lo, hi] taken from a strided sample; None if the
    bracket misses rank ``r`` (the caller then searches the whole tensor).

    Exact: with ``below`` = #(values < lo), rank r lies in the bracket iff below < r <= #(values <=
    hi), and then the answer is the (r - below)-th smallest of the values in [lo, hi]. NaNs count
    in neither, which matches kthvalue ordering them last; a NaN bound makes the check fail.
    """
    lo, hi = _bracket(values, r)
    below = int(torch.count_nonzero(values < lo))
    if below >= r:
        return None
    inside = values <= hi
    if int(torch.count_nonzero(inside)) < r:
        return None
    if lo == hi:  # every value in the bracket equals lo (a mass of ties, e.g. exact zeros)
        return lo.clone()
    inside &= values >= lo
    return torch.kthvalue(values[inside], r - below).values


def _bracketed_topk_mask(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """``topk_mask`` of a large flat CPU tensor without ranking all of it; None if the sampled
    bracket [lo, hi] misses the k-th largest value T or the tensor is not all finite.

    Everything above ``hi`` is kept and everything below ``lo`` dropped; only the few entries in
    [lo, hi] are ranked. T lies in the bracket iff #(> hi) < k <= #(>= lo); then the kept set is
    the entries above ``hi`` plus the ``k - #(> hi)`` largest in the bracket, ties at T going to
    the lowest indices: exactly the set of the threshold rule in ``topk_mask``. A bracket of one
    value, or a mass of ties at ``lo`` (such as the exact zeros of untouched embedding rows), is
resolved without ranking the mass.
    """
    n = flat.numel()
    if not bool(torch.isfinite(flat.sum())):  # NaN/Inf (or overflow): the plain path
        return None
    lo, hi = _bracket(flat, n - k + 1)
    mask = flat > hi
    need = k - int(torch.count_nonzero(mask))
    if need <= 0:
        return None
    inside = flat >= lo
    inside ^= mask  # lo <= hi, so (> hi) is a subset of (>= lo): this leaves [lo, hi]
    count = int(torch.count_nonzero(inside))
    if need > count:
        return None
    if lo == hi:  # T = lo, and every entry in the bracket ties at it: keep the first ``need``
        end = _position_of(inside, need) + 1
        mask[:end] |= inside[:end]
        return mask
    if count > n // 8:  # a mass of ties in the bracket, normally at lo (the exact zeros)
        at_lo = flat == lo
        inside ^= at_lo  # (lo, hi]
        count -= int(torch.count_nonzero(at_lo))
        if need > count:  # T = lo: keep (lo, hi] and the first entries equal to lo
            mask |= inside
            end = _position_of(at_lo, need - count) + 1
            mask[:end] |= at_lo[:end]
            return mask
        if count > n // 8:
            return None
    index = torch.nonzero(inside).reshape(-1)  # ascending
    values = flat[index]
    threshold = torch.kthvalue(values, values.numel() - need + 1).values
    keep = values > threshold
    missing = need - int(torch.count_nonzero(keep))
    if missing > 0:
        tied = values == threshold
        keep |= tied & (torch.cumsum(tied, 0) <= missing)
    mask[index[keep]] = True
    return mask


def block_counts(flags: torch.Tensor, blocks: int, block: int) -> torch.Tensor:
    """True entries per block of a flat CPU/GPU bool tensor (int64). On the CPU numpy's integer
    add-reduce over the bytes: torch's count_nonzero along a dimension is ~20x slower."""
    if flags.device.type == "cpu":
        import numpy as np

        u8 = flags.view(torch.uint8).numpy().reshape(blocks, block)
        return torch.from_numpy(np.add.reduce(u8, axis=1, dtype=np.int64))
    return torch.count_nonzero(flags.view(blocks, block), dim=1)


def _position_of(flags: torch.Tensor, count: int) -> int:
    """Flat index of the ``count``-th (1-based) True entry of a flat bool tensor, from per-block
    counts: no index array the size of the tensor."""
    block = 1 << 16
    n = flags.numel()
    full = n // block
    counts = block_counts(flags[: full * block], full, block)
    if n > full * block:
        counts = torch.cat([counts, torch.count_nonzero(flags[full * block:]).reshape(1)])
    cumulative = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(cumulative, torch.tensor(count)))  # first block reaching count
    before = int(cumulative[b - 1]) if b > 0 else 0
    local = torch.nonzero(flags[b * block: (b + 1) * block]).reshape(-1)
    return b * block + int(local[count - before - 1])


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries; among equal values the lowest indices win."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if n >= SELECT_DIRECT and flat.device.type == "cpu" and flat.is_floating_point():
        fast = _bracketed_topk_mask(flat, k)
        if fast is not None:
            return fast.reshape(magnitude.shape)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(magnitude.shape)


def threshold_mask(magnitude: torch.Tensor, threshold: float | torch.Tensor, ties: int
                   ) -> torch.Tensor:
    """Entries strictly above ``threshold`` plus the first ``ties`` entries equal to it."""
    flat = magnitude.reshape(-1)
    mask = flat > threshold
    if ties > 0:
        tied = torch.nonzero(flat == threshold).reshape(-1)[:ties]
        mask[tied] = True
    return mask.reshape(magnitude.shape)


# --- quantiles and the quantile ratio (TADrop) -----------------------------------------------

def keep_count_from_drop(drop_rate: float, n: int) -> int:
    """Entries kept at drop rate p: round-half-up((1 - p) n) in exact rationals, >= 1 if p < 1.

    Computing 1 - p exactly (Fraction) makes drop rate 0.8 keep the same count as density 0.2.
    """
    if n <= 0:
        return 0
    keep = Fraction(1) - Fraction(repr(float(drop_rate)))
    if keep <= 0:
        return 0
    return max(1, min(n, int(keep * n + Fraction(1, 2))))


def keep_fraction_from_drop(drop_rate: float) -> float:
    """1 - p as the float nearest the exact rational (1 - 0.8 gives 0.2, not 0.19999999999999996)."""
    return float(Fraction(1) - Fraction(repr(float(drop_rate))))


def _ranks(qs: list[float], n: int) -> list[tuple[int, float]]:
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile level {q} is outside [0, 1]")
        r = q * (n - 1)
        lo = int(r)
        out.append((lo, r - lo))
    return out


def quantiles(x: torch.Tensor, qs: list[float] | tuple[float, ...]) -> list[float]:
    """Exact linear-interpolation quantiles (numpy's default: rank q*(n-1)), any size and dtype.

    ``torch.quantile`` refuses tensors above 2^24 elements; this uses one multi-pivot partition
    (numpy ``partition``, O(n)) on CPU and ``kthvalue`` on other devices. bf16/fp16 are upcast to
    float32 first; the interpolation itself is done in float64. Returns Python floats.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantiles of an empty tensor are undefined")
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.to(torch.float32)
    ranks = _ranks(list(qs), n)
    needed = sorted({k for lo, frac in ranks for k in ((lo, lo + 1) if frac > 0 else (lo,))})
    if flat.device.type == "cpu":
        import numpy as np

        values = _bracketed_order_stats(flat.numpy(), needed) if n >= SELECT_DIRECT else None
        if values is None:
            part = np.partition(flat.numpy(), needed)
            values = {k: float(part[k]) for k in needed}
    else:
        values = {k: float(torch.kthvalue(flat, k + 1).values) for k in needed}
    return [values[lo] + frac * (values[lo + 1] - values[lo]) if frac > 0 else values[lo]
            for lo, frac in ranks]


def _bracketed_order_stats(v: Any, ranks: list[int]) -> dict[int, float] | None:
    """The ``ranks``-th smallest values (0-based, as ``np.partition`` places them) of a large
    numpy array without partitioning all of it; None when a sampled bracket misses.

    Each group of neighbouring ranks gets a bracket [lo, hi] from a strided sample; the values
    below lo and equal to lo are counted, those in (lo, hi] gathered; rank r lies in the
    bracket iff below <= r < below + at_lo + inside, and is then lo, or the
    (r - below - at_lo)-th smallest inside. NaNs (ordered last by ``partition``) are in none,
    so a rank among them misses. Exact: the same values.
    """
    import numpy as np

    n = v.size
    lo_m, hi_m = SELECT_SAMPLE
    ordered = np.sort(v[:: max(1, n // min(hi_m, max(lo_m, int(8 * math.sqrt(n)))))])
    m = ordered.size
    margin = 3.0 * math.sqrt(m) + 2
    out: dict[int, float] = {}
    for group in _neighbours(ranks):
        first, last = (group[0] / (n - 1) * (m - 1), group[-1] / (n - 1) * (m - 1))
        lo, hi = ordered[max(0, int(first - margin))], ordered[min(m - 1, int(last + margin) + 1)]
        below = int(np.count_nonzero(v < lo))
        at_lo = int(np.count_nonzero(v == lo))  # counted, not gathered: often a mass (zeros)
        band = np.compress((v > lo) & (v <= hi), v)
        if not below <= group[0] <= group[-1] < below + at_lo + band.size:
            return None
        start = below + at_lo  # rank of the band's smallest value
        inside = [r - start for r in group if r >= start]
        part = np.partition(band, inside) if inside else band
        out.update({r: float(lo) if r < start else float(part[r - start]) for r in group})
    return out


def _neighbours(ranks: list[int]) -> list[list[int]]:
    """Sorted ranks split where they are more than one apart (an interpolation's two ranks stay
    in one group)."""
    groups: list[list[int]] = []
    for r in sorted(ranks):
        if groups and r - groups[-1][-1] <= 1:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def quantile_ratio(delta: torch.Tensor, low: float = 0.5, high: float = 0.95) -> float | None:
    """d = Q_low(|tau|) / Q_high(|tau|): scale- and sign-invariant flatness of a task vector.

    Near 0 for heavy-tailed (sparse, critical) tensors, higher for flat (dense, redundant) ones:
    Gaussian 0.344, Laplace 0.231, uniform 0.526. None when Q_high = 0 (the tensor is kept as is).
    """
    flat = delta.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.numel() >= SELECT_DIRECT:
        from .scratch import scratch  # |tau| in a reused buffer: no page faults per tensor

        magnitude = torch.abs(flat, out=scratch(flat.numel(), torch.float32))
    else:
        magnitude = flat.abs()
    q_low, q_high = quantiles(magnitude, [low, high])
    if q_high <= 0.0:
        return None
    return q_low / q_high
