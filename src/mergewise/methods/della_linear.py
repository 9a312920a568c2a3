"""DELLA + Task Arithmetic (Deep et al. 2024, arXiv:2406.11617): MagPrune, then a weighted sum
(mergekit's ``della_linear``).

Each task vector is MagPruned (the ``magprune`` sparsifier: per-row keep probabilities from
density - epsilon for the smallest |tau| to density + epsilon for the largest, then L1
rescale; ``density`` 1.0 = no drop, ``epsilon`` 0.15), then
theta = theta0 + lambda * sum_k w_k tau_k (``normalize: true`` divides by the sum of the
weights). A ``sparsify:`` block (e.g. TADrop) replaces the MagPrune step.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| drop                | MagPrune: per-row rank probabilities density ± epsilon (see ``magprune``) |
| rescale             | L1 norm matching (``rescale``, default true, mergekit)     |
| sign election       | none                                                       |
| aggregation         | weighted sum; ``normalize`` (default false, mergekit) divides by the sum of the weights |
| global scale        | ``lambda`` 1.0                                             |
| int8_mask           | accepted, no effect                                        |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| math dtype          | ``dtype`` (float32 default)                                |
| mergekit            | one global generator in tensor-name order: masks equal only in distribution   |
| mergekit            | see ``magprune``: ties, one-entry rows, the density ± epsilon check before merging |
| mergekit            | ``normalize`` with weights summing to 0 divides by 1; here a one-line error   |
"""

from __future__ import annotations

from ..registry import METHODS, MergeMethod
from .task_arithmetic import TA_PARAMS, task_arithmetic

METHODS.register(MergeMethod(
    name="della_linear",
    func=task_arithmetic,
    space="delta",
    params=TA_PARAMS,
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="magprune",
))
