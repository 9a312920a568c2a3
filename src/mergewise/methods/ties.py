"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge; mergekit's semantics.

1. Trim: each task vector keeps its top ``density`` by |tau|, exact count
   round-half-up(density x n), ties by index; per tensor by default, ``scope: global``
   model-wide (the paper). ``density`` defaults to 1.0 (no trim), as in mergekit; the paper's
   k = 20% is ``density: 0.2``.
2. Weight: tau_k <- w_k * tau_k (per-model ``weight``, before the vote, as mergekit does).
3. Elect: sign = sign(sum_k tau_k); an exact 0 sum counts as + (mergekit's rule; the paper's
   code resolves 0 to the global majority).
4. Disjoint merge over the entries that are non-zero and agree with the elected sign:
   ``normalize: true`` (default, mergekit) divides their sum by the sum of their models'
   weights (with unit weights, exactly the paper's disjoint mean); ``normalize: false`` keeps
   the sum (dis-sum). ``aggregate`` overrides it: ``mean`` divides by the count of agreeing
   models (the paper's code with weights), ``sum``, ``weighted_mean``. Entries nobody agrees
   on stay 0.
5. theta = theta0 + lambda * tau_merged (``lambda`` default 1.0, applied after the division).

| question            | mergewise                                             |
|---------------------|-------------------------------------------------------|
| trim scope          | per tensor (``scope: tensor``), or ``global``         |
| keep fraction       | ``density`` (keep), default 1.0 (mergekit)            |
| keep count          | round-half-up(density x n), ties by index (mergekit: int(), unstable argsort) |
| sign election input | weighted, trimmed task vectors; sum; 0 counts as +    |
| aggregation         | ``normalize`` (mergekit, default true) or ``aggregate`` |
| global scale        | ``lambda`` 1.0                                        |
| rescale             | none                                                  |
| int8_mask           | accepted, no effect (masks are bool; mergekit's too)  |
| RNG                 | none                                                  |
| math dtype          | ``dtype`` (float32 default)                           |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import rounded_weight, weighted_sum
from ..registry import INT8_MASK, LAMBDA, METHODS, MergeMethod, Param, normalize_param

AGGREGATE = Param("aggregate", None, str,
                  "overrides normalize: mean (the paper: divide by the count of agreeing "
                  "models), sum, weighted_mean (divide by the sum of their weights)",
                  choices=("mean", "sum", "weighted_mean"))
def aggregation(normalize: bool, aggregate: str | None) -> str:
    """The disjoint-merge rule: ``aggregate`` when given, else mergekit's ``normalize``."""
    return aggregate or ("weighted_mean" if normalize else "sum")


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               *, lam: float = 1.0, normalize: bool = True, aggregate: str | None = None,
               int8_mask: bool = False) -> torch.Tensor:
    """Elect + disjoint merge of already-trimmed task vectors (shared by the *_ties methods).

    Written for speed and memory on large tensors, with the same float operations as the plain
    version (agree = w*tau * sign > 0; merged = sum of where(agree, w*tau, 0); divisor = count
    of agreeing models or the sum of their weights, 0 -> 1; base + lambda * merged/divisor):
    masks are float 0/1 tensors (torch's float kernels are several times faster than its bool
    ones), and the agreeing entries are summed as |w*tau| = w*tau*sign, the sum multiplied by
    the sign once at the end: multiplying by +-1 is exact and commutes with rounding, so every
    partial sum is the plain one up to its sign, bit for bit. Five buffers of the tensor's size.
    """
    aggregate = aggregation(normalize, aggregate)
    dtype = tensors[0].dtype
    total = weighted_sum(tensors, weights)
    sign = torch.ge(total, 0, out=total).mul_(2.0).sub_(1.0)  # where(total >= 0, 1, -1)
    merged = torch.zeros_like(sign)  # sum of the agreeing |w*tau|
    product = torch.empty_like(sign)
    agree = torch.empty_like(sign)  # 1.0 where model k agrees with the sign, else 0.0
    divisor = torch.zeros_like(sign) if aggregate != "sum" else None
    for w, d in zip(weights, tensors, strict=True):
        wd = rounded_weight(w, dtype)
        torch.mul(d, sign, out=product)  # tau * sign: exact
        if wd != 1.0:
            product.mul_(wd)  # (tau * sign) * w = sign * round(w * tau), exactly
        torch.gt(product, 0, out=agree)
        merged.addcmul_(product, agree)  # + |w*tau| where agreeing (x 0/1: exact)
        if aggregate == "mean":
            divisor.add_(agree)  # type: ignore[union-attr]  # exact small integers
        elif aggregate == "weighted_mean":
            divisor.add_(agree, alpha=wd)  # type: ignore[union-attr]  # + w or + 0, exact
    del product, agree
    merged.mul_(sign).add_(0.0)  # back to signed values; + 0 turns the -0 of 0 * -1 into +0
    if divisor is not None:
        # ``== 0`` too: in float16 the literal 1e-12 rounds to 0, so ``< 1e-12`` alone misses
        # empty entries and 0/0 gives NaN
        empty = (divisor == 0) | (divisor.abs() < 1e-12)
        merged.div_(divisor.masked_fill_(empty, 1.0))
    if lam != 1.0:
        merged.mul_(lam)  # lambda * merged (1.0 * x is x, bit for bit)
    if base.dtype != merged.dtype or base.shape != merged.shape:
        return base + merged  # type promotion / broadcasting as the plain expression
    return merged.add_(base)  # base + lambda * merged: float addition commutes exactly


METHODS.register(MergeMethod(
    name="ties",
    func=ties_merge,
    space="delta",
    params=(LAMBDA, normalize_param(True), AGGREGATE, INT8_MASK),
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="magnitude",
))
