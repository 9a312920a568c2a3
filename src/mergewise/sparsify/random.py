"""DARE random drop: keep each entry with probability ``density``, rescale kept ones by 1/density.

Dividing by the keep probability (= 1/(1-p) for drop rate p) preserves each entry's expectation,
as in the DARE paper and FusionBench; mergekit instead matches the L1 norm. The mask is drawn on
the CPU from the per-(seed, model, tensor) generator, so it is the same whatever the tensor order
or device.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import SPARSIFIERS, Param, Sparsifier


def random_drop(delta: torch.Tensor, *, density: float, rescale: bool = True,
                generator: torch.Generator | None = None, stats: Any = None) -> torch.Tensor:
    if density >= 1.0 or delta.numel() == 0:
        return delta
    if generator is None:
        raise ValueError("random_drop needs a seeded generator")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * keep.to(delta.device)
    return out / density if rescale else out


SPARSIFIERS.register(Sparsifier(
    name="random",
    func=random_drop,
    params=(
        Param("density", 0.1, float, "keep probability of each entry (DARE drop rate p = 1 - density)",
              low=0.0, high=1.0, low_open=True),
        Param("rescale", True, bool, "divide kept entries by density (DARE's 1/(1-p))"),
    ),
    doc=__doc__ or "",
    random=True,
))
