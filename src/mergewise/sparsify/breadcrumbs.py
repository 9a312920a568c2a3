"""Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and keep the next ``density``.

Per tensor, entries are ranked by |tau| (ties by index). The first round-half-up(gamma x n) are
dropped as outliers (none when gamma = 0), the next round-half-up(density x n) are kept (at
least one, capped at what the outliers leave), the rest dropped. No rescaling (mergekit and the
paper's default).
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import SPARSIFIERS, Param, Sparsifier
from ..selection import keep_count, round_half_up, topk_mask


def breadcrumbs(delta: torch.Tensor, *, density: float, gamma: float = 0.01,
                generator: torch.Generator | None = None, stats: Any = None) -> torch.Tensor:
    n = delta.numel()
    if n == 0:
        return delta
    outliers = min(round_half_up(gamma, n), n - 1)
    kept = min(keep_count(density, n), n - outliers)
    mag = delta.abs()
    mask = topk_mask(mag, outliers + kept)
    if outliers:
        mask &= ~topk_mask(mag, outliers)
    return delta * mask


SPARSIFIERS.register(Sparsifier(
    name="breadcrumbs",
    func=breadcrumbs,
    params=(
        Param("density", 0.9, float, "fraction of entries kept after the outliers",
              low=0.0, high=1.0, low_open=True),
        Param("gamma", 0.01, float, "fraction of largest-|tau| entries dropped as outliers",
              low=0.0, high=1.0, high_open=True),
    ),
    doc=__doc__ or "",
))
