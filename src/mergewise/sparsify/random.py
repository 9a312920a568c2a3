"""DARE random drop: keep each entry with probability ``density``, then rescale the kept ones.

``rescale: true`` (default) means what it means in mergekit: the kept entries are scaled so the
tensor keeps its L1 norm (sum |tau| before / after, skipped when either is below 1e-7).
``rescale_rule: density`` selects the DARE paper's (and FusionBench's) rule instead: divide by
the keep probability (= 1/(1-p) for drop rate p), which preserves each entry's expectation.
The mask is drawn on the CPU from the per-(seed, model, tensor) generator, so it is the same
whatever the tensor order or device (mergekit draws from one global generator in tensor-name
order, so masks are equal only in distribution).
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import SPARSIFIERS, Param, Sparsifier

L1_EPS = 1e-7


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` scaled to ``delta``'s L1 norm (mergekit's rescale), unless either norm is
    below 1e-7; the norms and their ratio are computed in the tensor's dtype, as mergekit."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if float(before) < L1_EPS or float(after) < L1_EPS:
        return kept
    return kept * (before / after)


def random_drop(delta: torch.Tensor, *, density: float, rescale: bool = True,
                rescale_rule: str = "l1", generator: torch.Generator | None = None,
                stats: Any = None) -> torch.Tensor:
    if density >= 1.0 or delta.numel() == 0:
        return delta
    if generator is None:
        raise ValueError("random_drop needs a seeded generator")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * keep.to(delta.device)
    if not rescale:
        return out
    return out / density if rescale_rule == "density" else l1_rescaled(delta, out)


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
))
