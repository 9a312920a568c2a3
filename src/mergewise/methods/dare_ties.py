"""DARE + TIES: random drop with 1/density rescale, then TIES sign election and disjoint merge.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| drop                | Bernoulli per entry, keep probability ``density`` (0.1)    |
| rescale             | 1/density (paper); mergekit matches the L1 norm            |
| sign election input | weighted dropped task vectors; sign of sum; 0 counts as +  |
| aggregation         | ``aggregate``: mean (paper code) / sum (mergekit default) / weighted_mean |
| global scale        | ``lambda`` 1.0                                             |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from ..registry import LAMBDA, METHODS, MergeMethod
from .ties import AGGREGATE, ties_merge

METHODS.register(MergeMethod(
    name="dare_ties",
    func=ties_merge,
    space="delta",
    params=(LAMBDA, AGGREGATE),
    doc=__doc__ or "",
    sparsifier="random",
    sparsifier_defaults={"density": 0.1},
    block_defaults={"mode": "random"},
))
