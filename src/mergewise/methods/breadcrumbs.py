"""Model Breadcrumbs (Davari & Belilovsky 2023) + Task Arithmetic.

Per tensor, drop the largest ``gamma`` fraction of |tau| (outliers, default 0.01) and keep the
next ``density`` fraction (default 0.9, mergekit's documented example), no rescale; then
theta = theta0 + lambda * sum_k w_k tau_k.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| trim                | per tensor: drop top gamma, keep next density, ties by index |
| rescale             | none                                                       |
| sign election       | none                                                       |
| aggregation         | weighted sum (``normalize`` divides by sum of weights)     |
| global scale        | ``lambda`` 1.0                                             |
| RNG                 | none                                                       |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from ..registry import LAMBDA, METHODS, MergeMethod
from .task_arithmetic import NORMALIZE_OFF, task_arithmetic

METHODS.register(MergeMethod(
    name="breadcrumbs",
    func=task_arithmetic,
    space="delta",
    params=(LAMBDA, NORMALIZE_OFF),
    doc=__doc__ or "",
    sparsifier="breadcrumbs",
))
