"""Task Arithmetic (Ilharco et al. 2023): theta = theta0 + lambda * sum_k w_k * tau_k.

| question            | mergewise                                                   |
|---------------------|-------------------------------------------------------------|
| trim scope          | optional: ``density`` < 1 keeps top magnitude per tensor (``scope: global`` model-wide) |
| keep fraction       | ``density`` (keep), default 1.0 = no trim                   |
| sign election       | none                                                        |
| aggregation         | sum of weighted task vectors; ``normalize: true`` divides by sum of weights |
| int8_mask           | accepted (mergekit), no effect                              |
| global scale        | ``lambda`` (default 1.0)                                    |
| rescale             | none                                                        |
| RNG                 | none                                                        |
| math dtype          | ``dtype`` (float32 default)                                 |

A ``sparsify:`` block replaces the trim step with any registered sparsifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import divide_by_weight_sum, weighted_sum
from ..registry import INT8_MASK, LAMBDA, METHODS, MergeMethod, normalize_param


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    *, lam: float = 1.0, normalize: bool = False,
                    int8_mask: bool = False) -> torch.Tensor:
    tau = weighted_sum(tensors, weights)
    if normalize:
        divide_by_weight_sum(tau, weights, "task_arithmetic")
    return base + lam * tau


# the parameters of mergekit's task-arithmetic methods without a sign vote
TA_PARAMS = (LAMBDA, normalize_param(False), INT8_MASK)

METHODS.register(MergeMethod(
    name="task_arithmetic",
    func=task_arithmetic,
    space="delta",
    params=TA_PARAMS,
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="magnitude",
    sparsifier_defaults={"density": 1.0},
))
