"""Model Breadcrumbs trim, then TIES sign election and disjoint merge (mergekit's
``breadcrumbs_ties``).

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| trim                | per tensor: drop top ``gamma`` (0.01), keep next ``density`` (1.0: no trim, mergekit) |
| sign election input | weighted trimmed task vectors; sum; 0 counts as +          |
| aggregation         | ``normalize`` (default false: sum, mergekit) or ``aggregate`` |
| global scale        | ``lambda`` 1.0                                             |
| rescale             | none                                                       |
| RNG                 | none                                                       |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import INT8_MASK, LAMBDA, METHODS, MergeMethod, normalize_param
from .ties import AGGREGATE, ties_merge


def breadcrumbs_ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                           weights: Sequence[float], *, lam: float = 1.0,
                           normalize: bool = False, aggregate: str | None = None,
                           int8_mask: bool = False) -> torch.Tensor:
    return ties_merge(base, tensors, weights, lam=lam, normalize=normalize, aggregate=aggregate)


METHODS.register(MergeMethod(
    name="breadcrumbs_ties",
    func=breadcrumbs_ties_merge,
    space="delta",
    params=(LAMBDA, normalize_param(False), AGGREGATE, INT8_MASK),
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="breadcrumbs",
    sparsifier_defaults={"density": 1.0},
))
