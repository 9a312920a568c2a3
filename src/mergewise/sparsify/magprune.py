"""DELLA MagPrune (Deep et al. 2024, arXiv:2406.11617): random drop with keep probabilities
that grow with magnitude, then rescale (mergekit's ``della_magprune``).

Per row (dimension 1; a 1-D tensor is one row), entries are ranked by |tau| (0 = smallest, ties
by index) and entry i of a row of m keeps with probability

    p_i = (density - epsilon) + 2 epsilon * rank_i / (m - 1)

from density - epsilon for the smallest to density + epsilon for the largest (a row of one entry
keeps with p = density). ``rescale: true`` (default, mergekit) then scales the kept entries to the
tensor's L1 norm, as DARE's ``random`` does. density >= 1 keeps the tensor as it is. density ±
epsilon must lie inside (0, 1): a recipe outside it fails before any tensor is merged.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| ranks               | per row of abs(tau), along dimension 1; ties by index (stable sort) |
| probabilities       | float32, in mergekit's operation order                     |
| one-entry rows      | p = density                                                |
| rescale             | L1 norm matching in the compute dtype (``l1_rescaled``, as ``random``) |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| mergekit            | torch's global generator in tensor-name order: masks equal only in distribution |
| mergekit            | ties ranked by an unstable argsort                                          |
| mergekit            | bfloat16: ranks and probabilities in bfloat16 (rows over 256 entries round)   |
| mergekit            | float16/float64: masked and rescaled in float32                             |
| mergekit            | a one-entry row (one-entry 1-D, an [n, 1] tensor) gives 0/0 = NaN probabilities |
| mergekit            | density ± epsilon outside (0, 1) raises mid-merge; here before the merge pass (a |
|                     | value from a tensor filter is checked when that tensor is merged)           |
| mergekit            | accepts a negative epsilon (larger entries dropped more); here epsilon >= 0  |
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RecipeError
from ..registry import SPARSIFIERS, Param, Sparsifier
from .random import l1_rescaled


def check_window(density: float, epsilon: float) -> None:
    """density ± epsilon inside (0, 1) whenever the tensor is pruned (0 < density < 1)."""
    if 0.0 < density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise RecipeError(
            f"magprune (della): density {density:g} ± epsilon {epsilon:g} gives keep "
            f"probabilities from {density - epsilon:g} to {density + epsilon:g}, which must lie "
            f"inside (0, 1); use an epsilon below {min(density, 1.0 - density):g}")


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per entry: (density - epsilon) + rank_norm * 2 * epsilon in float32, rank_norm the
    entry's rank by |tau| in its row over (row length - 1); shaped as ``delta``'s rows."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True).to(torch.float32)  # 0 .. m - 1
    if m > 1:
        rank_norm = (ranks / (m - 1)).clamp(0, 1)
    else:
        rank_norm = torch.full_like(ranks, 0.5)  # the middle of the window: p = density
    return (density - epsilon) + rank_norm * 2 * epsilon


def magprune(delta: torch.Tensor, *, density: float = 1.0, epsilon: float = 0.15,
             rescale: bool = True, generator: torch.Generator | None = None,
             stats: Any = None) -> torch.Tensor:
    if density >= 1.0 or delta.numel() == 0:
        return delta
    check_window(density, epsilon)
    if generator is None:
        raise ValueError("magprune needs a seeded generator")
    p = keep_probabilities(delta, density, epsilon).cpu()
    keep = torch.rand(p.shape, generator=generator, dtype=torch.float32) < p
    out = delta * keep.reshape(delta.shape).to(delta.device)
    return l1_rescaled(delta, out) if rescale else out


def _stats(density: float = 1.0, epsilon: float = 0.15, **_: Any) -> None:
    """No statistics: only the density ± epsilon check, before the merge pass."""
    check_window(density, epsilon)


SPARSIFIERS.register(Sparsifier(
    name="magprune",
    func=magprune,
    params=(
        Param("density", 1.0, float, "mean keep probability (1.0: no drop)", low=0.0, high=1.0,
              low_open=True),
        Param("epsilon", 0.15, float, "half-width of the keep-probability window around "
              "density (smallest |tau| density - epsilon, largest density + epsilon)", low=0.0),
        Param("rescale", True, bool, "rescale the kept entries to the tensor's L1 norm "
              "(mergekit)"),
    ),
    doc=__doc__ or "",
    random=True,
    stats=_stats,
))
