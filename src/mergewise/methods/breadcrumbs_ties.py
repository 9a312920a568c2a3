"""Model Breadcrumbs trim, then TIES sign election and disjoint merge.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| trim                | per tensor: drop top ``gamma`` (0.01), keep next ``density`` (0.9) |
| sign election input | weighted trimmed task vectors; sign of sum; 0 counts as +  |
| aggregation         | ``aggregate``: mean (default) / sum / weighted_mean        |
| global scale        | ``lambda`` 1.0                                             |
| rescale             | none                                                       |
| RNG                 | none                                                       |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from ..registry import LAMBDA, METHODS, MergeMethod
from .ties import AGGREGATE, ties_merge

METHODS.register(MergeMethod(
    name="breadcrumbs_ties",
    func=ties_merge,
    space="delta",
    params=(LAMBDA, AGGREGATE),
    doc=__doc__ or "",
    sparsifier="breadcrumbs",
))
