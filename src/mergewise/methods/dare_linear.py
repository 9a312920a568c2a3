"""DARE + Task Arithmetic (Yu et al. 2024): random drop, rescale, then a weighted sum.

Each task vector keeps each entry with probability ``density`` (default 1.0: no drop, as in
mergekit; the paper's examples use 0.1, drop rate p = 0.9), the kept entries are rescaled to the
tensor's L1 norm (mergekit's ``rescale: true``; ``rescale_rule: density`` divides by density,
1/(1-p), as the paper; ``rescale: false`` turns it off), then
theta = theta0 + lambda * sum_k w_k tau_k.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| drop                | Bernoulli per entry, keep probability ``density`` (1.0)    |
| rescale             | L1 norm matching (mergekit); ``rescale_rule: density``: 1/density (paper, FusionBench) |
| sign election       | none                                                       |
| aggregation         | weighted sum (``normalize: true`` divides by sum of weights) |
| global scale        | ``lambda`` 1.0                                             |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from ..registry import METHODS, MergeMethod
from .task_arithmetic import TA_PARAMS, task_arithmetic

METHODS.register(MergeMethod(
    name="dare_linear",
    func=task_arithmetic,
    space="delta",
    params=TA_PARAMS,
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="random",
    sparsifier_defaults={"density": 1.0},
    block_defaults={"mode": "random"},
))
