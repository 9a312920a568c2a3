"""DARE + Task Arithmetic (Yu et al. 2024): random drop, rescale, then a weighted sum.

Each task vector keeps each entry with probability ``density`` (default 0.1, i.e. drop rate
p = 0.9 as in the paper's examples), kept entries divided by ``density`` (= 1/(1-p), preserves
the expectation; ``rescale: false`` turns it off), then theta = theta0 + lambda * sum_k w_k tau_k.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| drop                | Bernoulli per entry, keep probability ``density``          |
| rescale             | 1/density (paper, FusionBench); mergekit matches the L1 norm |
| sign election       | none                                                       |
| aggregation         | weighted sum (``normalize: true`` divides by sum of weights) |
| global scale        | ``lambda`` 1.0                                             |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from ..registry import LAMBDA, METHODS, MergeMethod
from .task_arithmetic import NORMALIZE_OFF, task_arithmetic

METHODS.register(MergeMethod(
    name="dare_linear",
    func=task_arithmetic,
    space="delta",
    params=(LAMBDA, NORMALIZE_OFF),
    doc=__doc__ or "",
    sparsifier="random",
    sparsifier_defaults={"density": 0.1},
    block_defaults={"mode": "random"},
))
