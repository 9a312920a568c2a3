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
