"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: each task vector keeps its top ``density`` by |tau| (default 0.2, the paper's k = 20),
   exact count, ties by index; per tensor by default, ``scope: global`` model-wide (the paper).
2. Weight: tau_k <- w_k * tau_k (per-model ``weight``, before the vote, as mergekit does).
3. Elect: sign = sign(sum_k tau_k); an exact 0 sum counts as + (the paper's code resolves 0 to
   the global majority; we pick a fixed, order-free rule).
4. Disjoint merge over the entries that are non-zero and agree with the elected sign:
   ``aggregate: mean`` (default, paper dis-mean: divide by their count), ``sum`` (dis-sum, the
   8-task ViT setting), ``weighted_mean`` (mergekit's normalize: divide by the sum of their
   weights). Entries nobody agrees on stay 0.
5. theta = theta0 + lambda * tau_merged (``lambda`` default 1.0).

| question            | mergewise                                             |
|---------------------|-------------------------------------------------------|
| trim scope          | per tensor (``scope: tensor``), or ``global``         |
| keep fraction       | ``density`` (keep), default 0.2                        |
| sign election input | weighted, trimmed task vectors; sum; 0 counts as +    |
| aggregation         | mean over agreeing non-zero entries (``aggregate``)  |
| global scale        | ``lambda`` 1.0                                        |
| rescale             | none                                                  |
| RNG                 | none                                                  |
| math dtype          | ``dtype`` (float32 default)                           |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import LAMBDA, METHODS, MergeMethod, Param

AGGREGATE = Param("aggregate", "mean", str,
                  "how agreeing entries combine: mean (paper), sum, weighted_mean (mergekit)",
                  choices=("mean", "sum", "weighted_mean"))


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               *, lam: float = 1.0, aggregate: str = "mean") -> torch.Tensor:
    """Elect + disjoint merge of already-trimmed task vectors (shared by the *_ties methods)."""
    total = torch.zeros_like(tensors[0])
    for w, d in zip(weights, tensors, strict=True):
        total.add_(d, alpha=w)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, d in zip(weights, tensors, strict=True):
        weighted = d * w
        agree = weighted * sign > 0
        merged += torch.where(agree, weighted, 0.0)
        if aggregate == "mean":
            divisor += agree
        elif aggregate == "weighted_mean":
            divisor += agree * w
    if aggregate != "sum":
        # ``== 0`` too: in float16 the literal 1e-12 rounds to 0, so ``< 1e-12`` alone misses
        # empty entries and 0/0 gives NaN
        empty = (divisor == 0) | (divisor.abs() < 1e-12)
        divisor = torch.where(empty, torch.ones_like(divisor), divisor)
        merged /= divisor
    return base + lam * merged


METHODS.register(MergeMethod(
    name="ties",
    func=ties_merge,
    space="delta",
    params=(LAMBDA, AGGREGATE),
    doc=__doc__ or "",
    sparsifier="magnitude",
    sparsifier_defaults={"density": 0.2},
))
