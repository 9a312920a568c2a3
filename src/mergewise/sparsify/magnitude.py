"""Magnitude top-k: keep the ``density`` fraction of largest |tau|, per tensor or model-wide.

Per tensor (``scope: tensor``, mergekit's TIES): exactly round-half-up(density x numel) entries
are kept, at least one, ties broken by index. Model-wide (``scope: global``, the TIES paper and
FusionBench): one threshold over all tensors of the task vector, found exactly by the stats pass
(a radix histogram of the float bit patterns, then the candidates of one bin), so exactly
round-half-up(density x total) entries are kept in the whole model; ties at the threshold go to
the earliest tensors in checkpoint order, then to the lowest index. No rescaling: TIES does not
rescale trimmed values.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import SPARSIFIERS, Param, Sparsifier
from ..selection import keep_count, kth_largest, threshold_mask, topk_mask
from ..statspass import StatsPass
from ..streamselect import BandStep

BINS = 1 << 16


def _bits(magnitude: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer view of non-negative floats: ordering of the ints equals ordering of the values."""
    if magnitude.dtype == torch.float64:
        return magnitude.view(torch.int64), 48
    return magnitude.to(torch.float32).view(torch.int32), 16


class GlobalTopK(StatsPass):
    """Exact model-wide k-th largest |tau| for one task vector, in two streaming passes."""

    passes = 2

    def __init__(self, density: float):
        self.density = density
        self.hist = torch.zeros(BINS, dtype=torch.int64)
        self.total = 0
        self.bin = -1
        self.need = 0
        self.candidates: list[tuple[str, torch.Tensor]] = []
        self.threshold: torch.Tensor | None = None
        self.ties: dict[str, int] = {}
        self.keep_all = False

    def observe(self, pass_index: int, name: str, delta: torch.Tensor,
                params: dict[str, Any]) -> None:
        bits, shift = _bits(delta.abs().reshape(-1))
        keys = (bits >> shift).to(torch.int64)
        if pass_index == 0:
            self.hist += torch.bincount(keys, minlength=BINS).cpu()
            self.total += delta.numel()
        elif not self.keep_all:
            values = delta.abs().reshape(-1)[keys == self.bin].cpu()
            self.candidates.append((name, values))

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            k = keep_count(self.density, self.total)
            if k >= self.total:
                self.keep_all = True
                return
            from_top = torch.flip(self.hist, [0]).cumsum(0)
            idx = int(torch.searchsorted(from_top, torch.tensor(k)))
            self.bin = BINS - 1 - idx
            above = int(from_top[idx - 1]) if idx > 0 else 0
            self.need = k - above
            return
        if self.keep_all:
            return
        values = torch.cat([v for _, v in self.candidates])
        self.threshold = kth_largest(values, self.need)
        ties_left = self.need - int((values > self.threshold).sum())
        for name, v in self.candidates:
            take = min(ties_left, int((v == self.threshold).sum()))
            self.ties[name] = take
            ties_left -= take
        self.candidates = []

    def for_tensor(self, name: str) -> tuple[torch.Tensor, int] | None:
        if self.keep_all:
            return None
        return self.threshold, self.ties.get(name, 0)


def magnitude(delta: torch.Tensor, *, density: float, scope: str = "tensor",
              generator: torch.Generator | None = None, stats: Any = None) -> torch.Tensor:
    """Keep the largest-|tau| ``density`` fraction; everything else becomes 0."""
    if density >= 1.0 or delta.numel() == 0:
        return delta
    mag = delta.abs()
    if scope == "global":
        if stats is None:  # the stats pass found that everything is kept
            return delta
        threshold, ties = stats
        mask = threshold_mask(mag, threshold.to(mag.device), ties)
    else:
        mask = topk_mask(mag, keep_count(density, delta.numel()))
    # delta * mask, computed as float(mask) * delta (same products, signed zeros included) in
    # |delta|'s storage, which is no longer needed: float x float is much faster than x bool
    return mag.copy_(mask).mul_(delta)


def _streamed(n: int, sample_of: Any, *, density: float, scope: str = "tensor",
              **_: Any) -> BandStep | None:
    return BandStep(n, sample_of, keep_count(density, n)) if scope == "tensor" else None


def _stats(density: float, scope: str = "tensor", **_: Any) -> StatsPass | None:
    return GlobalTopK(density) if scope == "global" and density < 1.0 else None


SPARSIFIERS.register(Sparsifier(
    name="magnitude",
    func=magnitude,
    params=(
        Param("density", 1.0, float, "fraction of entries kept (largest |tau|)",
              low=0.0, high=1.0, low_open=True),
        Param("scope", "tensor", str, "top-k per tensor, or over the whole task vector",
              choices=("tensor", "global")),
    ),
    doc=__doc__ or "",
    keeps_all=lambda density, **_: density >= 1.0,
    stats=_stats,
    streamed=_streamed,
))
