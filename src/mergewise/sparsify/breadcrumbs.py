"""Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and keep the next ``density``.

Per tensor, entries are ranked by |tau| (ties by index). round-half-up(density x n) entries are
kept (at least one): those right after the first round-half-up(gamma x n) outliers, which are
dropped; when density + gamma exceed 1 the outliers shrink to what the kept ones leave (as
mergekit). density >= 1 keeps the tensor as it is, gamma included (mergekit). No rescaling
(mergekit and the paper's default).
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import SPARSIFIERS, Param, Sparsifier
from ..selection import keep_count, round_half_up, topk_mask
from ..streamselect import BandStep


def _counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(kept, outliers): the kept count after the outliers, which shrink to what it leaves."""
    kept = keep_count(density, n)
    return kept, min(round_half_up(gamma, n), n - kept)


def _streamed(n: int, sample_of: Any, *, density: float, gamma: float = 0.01,
              **_: Any) -> BandStep:
    kept, outliers = _counts(n, density, gamma)
    return BandStep(n, sample_of, outliers + kept, outliers)


def breadcrumbs(delta: torch.Tensor, *, density: float, gamma: float = 0.01,
                generator: torch.Generator | None = None, stats: Any = None) -> torch.Tensor:
    n = delta.numel()
    if n == 0 or density >= 1.0:
        return delta
    kept, outliers = _counts(n, density, gamma)
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
    keeps_all=lambda density, **_: density >= 1.0,
    streamed=_streamed,
))
