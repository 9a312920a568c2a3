"""DARE + TIES: random drop with rescale, then TIES sign election and disjoint merge.

mergekit's ``dare_ties``: ``density`` (keep probability) defaults to 1.0 (no drop), the kept
entries are rescaled to the tensor's L1 norm (``rescale: true``; ``rescale_rule: density`` for
the DARE paper's 1/density) and ``normalize`` defaults to false (dis-sum of the agreeing
weighted entries).

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| drop                | Bernoulli per entry, keep probability ``density`` (1.0)    |
| rescale             | L1 norm matching (mergekit); ``rescale_rule: density``: 1/density (paper) |
| sign election input | weighted dropped task vectors; sum; 0 counts as +          |
| aggregation         | ``normalize`` (default false: sum, mergekit) or ``aggregate`` |
| global scale        | ``lambda`` 1.0                                             |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| math dtype          | ``dtype`` (float32 default)                                |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import INT8_MASK, LAMBDA, METHODS, MergeMethod, normalize_param
from .ties import AGGREGATE, ties_merge


def dare_ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                    weights: Sequence[float], *, lam: float = 1.0, normalize: bool = False,
                    aggregate: str | None = None, int8_mask: bool = False) -> torch.Tensor:
    return ties_merge(base, tensors, weights, lam=lam, normalize=normalize, aggregate=aggregate)


METHODS.register(MergeMethod(
    name="dare_ties",
    func=dare_ties_merge,
    space="delta",
    params=(LAMBDA, normalize_param(False), AGGREGATE, INT8_MASK),
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="random",
    sparsifier_defaults={"density": 1.0},
    block_defaults={"mode": "random"},
))
