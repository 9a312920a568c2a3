"""Exact order statistics on tensors of any size: keep counts, top-k masks.

Top-k selections keep an exact count (round-half-up of density x numel, at least 1 when
density > 0) with ties broken by index (lower flat index wins), never by a ``>=`` threshold,
which keeps too many when values tie (common in bf16 and at exact zeros). ``kthvalue`` is used
instead of a full sort: it is a linear-time selection and has no size limit.
"""

from __future__ import annotations

from fractions import Fraction

import torch


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
    return torch.kthvalue(values, n - k + 1).values


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries; among equal values the lowest indices win."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    missing = k - int(mask.sum())
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

        part = np.partition(flat.numpy(), needed)
        values = {k: float(part[k]) for k in needed}
    else:
        values = {k: float(torch.kthvalue(flat, k + 1).values) for k in needed}
    return [values[lo] + frac * (values[lo + 1] - values[lo]) if frac > 0 else values[lo]
            for lo, frac in ranks]


def quantile_ratio(delta: torch.Tensor, low: float = 0.5, high: float = 0.95) -> float | None:
    """d = Q_low(|tau|) / Q_high(|tau|): scale- and sign-invariant flatness of a task vector.

    Near 0 for heavy-tailed (sparse, critical) tensors, higher for flat (dense, redundant) ones:
    Gaussian 0.344, Laplace 0.231, uniform 0.526. None when Q_high = 0 (the tensor is kept as is).
    """
    q_low, q_high = quantiles(delta.abs(), [low, high])
    if q_high <= 0.0:
        return None
    return q_low / q_high
