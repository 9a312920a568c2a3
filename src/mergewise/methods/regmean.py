"""RegMean (Jin et al. 2023): closed-form least squares on full weights, from layer Grams.

For every matmul weight (``nn.Linear``/``Conv2d``/``Conv1D``, statistics from ``mergewise
features``): W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹ in torch's (out, in) layout, where G_k = Σ xᵀx / n_k
is expert k's Gram divided by its row count (as FusionBench: tasks weigh equally whatever their
token counts) and G̃_k keeps the diagonal and multiplies the off-diagonal entries by ``alpha``
(default 0.95, FusionBench's CLIP setting; 1.0 is the plain least squares, MergeLM's default).
The system is solved in float64 (LU factors, as ``torch.linalg.solve``; a singular one falls
back to the pseudo-inverse), factored once for the projections that share a Gram (q/k/v).
Every other parameter (biases, norms, embeddings) is the plain mean of the experts' weights.
No base model is needed and there is no λ; an expert without statistics for a layer
contributes nothing to its solve.

| question            | mergewise                                                      |
|---------------------|----------------------------------------------------------------|
| space               | full weights (no task vectors, no sparsify block)              |
| Gram                | per task, divided by its row count; off-diagonal × ``alpha``   |
| solve               | float64 LU (``solve``'s), pseudo-inverse if singular; once per shared Gram (q/k/v) |
| capture options     | as LOT's: ``pack``, ``accumulate: float32``, ``blocks_per_pass``  |
| other parameters    | mean of the experts' weights                                     |
| global scale        | none                                                             |
| math dtype          | float64 for the solve, ``dtype`` elsewhere                       |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..features.statsfile import TensorFeature
from ..registry import METHODS, MergeMethod, Param
from .lot import (
    GRAM_OPTIONS,
    GRAM_WHY,
    SOLVES,
    accumulate,
    as_matrix,
    feature_kind,
    from_matrix,
    mean_of,
    stat,
    with_stats,
)

ALPHA = Param("alpha", 0.95, float, "multiplier of the Grams' off-diagonal entries (1 = plain "
              "least squares)", low=0.0, high=1.0)


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha × G off the diagonal, the diagonal unchanged."""
    if alpha == 1.0:
        return gram
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_merge(base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
                  weights: Sequence[float], *, features: Sequence[TensorFeature | None],
                  alpha: float = 0.95, name: str = "tensor") -> torch.Tensor:
    """The RegMean weight of one tensor from the experts' full weights ``tensors``."""
    if feature_kind(features, name) != "matmul":
        return mean_of(tensors)
    pairs = with_stats(tensors, features, per_row=True)
    if not pairs:
        return mean_of(tensors)
    cross = None
    for t, f, w in pairs:
        g = shrink(stat(f.gram, t, w), alpha)  # type: ignore[arg-type]
        cross = accumulate(cross, as_matrix(t, f) @ g, fresh=True)
    how, *factor = SOLVES.get(pairs, ("regmean", alpha), lambda: _factor_of_sum(pairs, alpha))
    if how == "lu":  # total is symmetric: X total = cross, X = (total⁻¹ crossᵀ)ᵀ
        solved = torch.linalg.lu_solve(factor[0], factor[1], cross.T).T  # type: ignore[union-attr]
    else:
        solved = cross @ factor[0]
    return from_matrix(solved, tensors[0], pairs[0][1])


def _factor_of_sum(pairs: Sequence[tuple[torch.Tensor, TensorFeature, float]], alpha: float
                   ) -> tuple[str, torch.Tensor] | tuple[str, torch.Tensor, torch.Tensor]:
    """The LU factors of Σ_k G̃_k (``solve``'s), or its pseudo-inverse when it is singular."""
    total = None
    for t, f, w in pairs:
        total = accumulate(total, shrink(stat(f.gram, t, w), alpha))  # type: ignore[arg-type]
    lu, pivots, info = torch.linalg.lu_factor_ex(total)  # type: ignore[arg-type]
    if int(info) != 0:
        return ("pinv", torch.linalg.pinv(total, hermitian=True))  # type: ignore[arg-type]
    return ("lu", lu, pivots)


METHODS.register(MergeMethod(
    name="regmean",
    func=regmean_merge,
    space="weight",
    params=(ALPHA,),
    doc=__doc__ or "",
    requires_base=False,
    model_params=(),
    accepts_sparsify=False,
    features=True,
    calibration_options=GRAM_OPTIONS,
    calibration_why=GRAM_WHY,
))
