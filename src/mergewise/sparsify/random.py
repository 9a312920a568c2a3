"""DARE random drop: keep each entry with probability ``density``, then rescale the kept ones.

``rescale: true`` (default) means what it means in mergekit: the kept entries are scaled so the
tensor keeps its L1 norm (sum |tau| before / after in the tensor's dtype, skipped when either is
below 1e-7; the sums are taken in float64 pieces of 2^18 entries and rounded to the dtype, so a
tensor merged whole, streamed chunk by chunk, or on CUDA gets the same factor).
``rescale_rule: density`` selects the DARE paper's (and FusionBench's) rule instead: divide by
the keep probability (= 1/(1-p) for drop rate p), which preserves each entry's expectation.
The mask is drawn on the CPU from the per-(seed, model, tensor) generator, so it is the same
whatever the tensor order or device (mergekit draws from one global generator in tensor-name
order, so masks are equal only in distribution).
"""

from __future__ import annotations

from typing import Any

import torch

from ..numerics import L1Sum, l1_sum
from ..registry import SPARSIFIERS, Param, Sparsifier

L1_EPS = 1e-7


def l1_ratio(before: float, after: float, like: torch.Tensor) -> torch.Tensor | None:
    """mergekit's factor sum |tau| / sum |kept|: both sums rounded to ``like``'s dtype (from
    ``L1Sum``'s float64 partials) and divided in it; None (no rescale) when either is below
    1e-7."""
    b = torch.tensor(before, dtype=like.dtype, device=like.device)
    a = torch.tensor(after, dtype=like.dtype, device=like.device)
    if float(b) < L1_EPS or float(a) < L1_EPS:
        return None
    return b / a


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` scaled to ``delta``'s L1 norm (mergekit's rescale), unless either norm is
    below 1e-7 (``l1_ratio``)."""
    ratio = l1_ratio(l1_sum(delta), l1_sum(kept), delta)
    return kept if ratio is None else kept * ratio


def _dropped(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool,
             rescale_rule: str, ratio: torch.Tensor | None) -> torch.Tensor:
    out = delta * keep.to(delta.device)
    if not rescale:
        return out
    if rescale_rule == "density":
        return out / density
    return out if ratio is None else out * ratio


def random_drop(delta: torch.Tensor, *, density: float, rescale: bool = True,
                rescale_rule: str = "l1", generator: torch.Generator | None = None,
                stats: Any = None) -> torch.Tensor:
    if density >= 1.0 or delta.numel() == 0:
        return delta
    if generator is None:
        raise ValueError("random_drop needs a seeded generator")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    if rescale and rescale_rule == "l1":
        return l1_rescaled(delta, delta * keep.to(delta.device))
    return _dropped(delta, keep, density, rescale, rescale_rule, None)


class RandomStep:
    """DARE's drop streamed chunk by chunk (``chunked``): the mask drawn piece by piece, in
    order, from the tensor's generator (torch draws CPU uniforms serially, so the pieces are
    exactly the whole draw), the L1 sums taken on the way (``L1Sum``: the whole path's bits),
    the rescale applied in the merge pass. Costs one bool per entry."""

    def __init__(self, n: int, generator: torch.Generator, density: float, rescale: bool,
                 rescale_rule: str):
        self.keep = torch.empty(n, dtype=torch.bool)
        self.generator, self.density = generator, density
        self.rescale, self.rule = rescale, rescale_rule
        self.l1 = rescale and rescale_rule == "l1"
        self.before, self.after = L1Sum(), L1Sum()
        self.ratio: torch.Tensor | None = None
        self.like: torch.Tensor | None = None

    def feed(self, part: slice, magnitude: torch.Tensor) -> None:
        """Draw this chunk's mask (chunks must come in order, each once)."""
        keep = torch.rand(part.stop - part.start, generator=self.generator,
                          dtype=torch.float32) < self.density
        self.keep[part] = keep
        if self.l1:
            self.before.add(magnitude)
            self.after.add(magnitude, keep)
            self.like = magnitude[:0]

    def ready(self, magnitude_at: Any = None) -> bool:
        if self.l1 and self.like is not None:
            self.ratio = l1_ratio(self.before.total, self.after.total, self.like)
        return True

    def apply(self, delta: torch.Tensor, magnitude: torch.Tensor, part: slice) -> torch.Tensor:
        return _dropped(delta, self.keep[part], self.density, self.rescale, self.rule,
                        self.ratio)


def _streamed(n: int, sample_of: Any, *, density: float, rescale: bool = True,
              rescale_rule: str = "l1", generator: torch.Generator | None = None,
              **_: Any) -> RandomStep | None:
    if generator is None:
        return None  # the whole-tensor path raises its own error
    return RandomStep(n, generator, density, rescale, rescale_rule)


SPARSIFIERS.register(Sparsifier(
    name="random",
    func=random_drop,
    params=(
        Param("density", 0.1, float, "keep probability of each entry (DARE drop rate p = 1 - density)",
              low=0.0, high=1.0, low_open=True),
        Param("rescale", True, bool, "rescale the kept entries (mergekit: to the tensor's L1 norm)"),
        Param("rescale_rule", "l1", str, "l1: match the L1 norm (mergekit); density: divide by "
              "density, 1/(1-p) (the DARE paper, FusionBench)", choices=("l1", "density")),
    ),
    doc=__doc__ or "",
    keeps_all=lambda density, **_: density >= 1.0,
    random=True,
    streamed=_streamed,
))
