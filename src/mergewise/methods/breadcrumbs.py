"""Model Breadcrumbs (Davari & Belilovsky 2023) + Task Arithmetic.

Per tensor, drop the largest ``gamma`` fraction of |tau| (outliers, default 0.01) and keep the
next ``density`` fraction, no rescale; then theta = theta0 + lambda * sum_k w_k tau_k.
``density`` defaults to 1.0, which (as in mergekit) keeps every entry, gamma included: give
both, e.g. ``density: 0.9, gamma: 0.01``.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| trim                | per tensor: drop top gamma, keep next density, ties by index |
| defaults            | density 1.0 (no trim), gamma 0.01 (mergekit)               |
| rescale             | none                                                       |
| sign election       | none                                                       |
| aggregation         | weighted sum (``normalize`` divides by sum of weights)     |
| global scale        | ``lambda`` 1.0                                             |
| RNG                 | none                                                       |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from ..registry import METHODS, MergeMethod
from .task_arithmetic import TA_PARAMS, task_arithmetic

METHODS.register(MergeMethod(
    name="breadcrumbs",
    func=task_arithmetic,
    space="delta",
    params=TA_PARAMS,
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="breadcrumbs",
    sparsifier_defaults={"density": 1.0},
))
