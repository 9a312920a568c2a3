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

from ..numerics import weighted_sum
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

    Written for speed on large tensors (preallocated scratch buffers instead of fresh
    temporaries); every value is computed by the same float operations as the plain version:
    agree = w*tau * sign > 0; merged += where(agree, w*tau, 0); divisor = count of agreeing
    models (0 -> 1); base + lambda * merged/divisor.
    """
    aggregate = aggregation(normalize, aggregate)
    total = weighted_sum(tensors, weights)
    agree = torch.ge(total, 0)  # scratch mask from here on
    disagree = torch.empty_like(agree)
    sign = total.copy_(agree).mul_(2.0).sub_(1.0)  # where(total >= 0, 1, -1), in total's storage
    merged = torch.zeros_like(sign)
    scratch = torch.empty_like(sign)
    weighted_buf = None
    # "mean" counts agreeing models exactly in a small integer tensor (no float adds of booleans)
    count = (torch.zeros_like(sign, dtype=torch.uint8)
             if aggregate == "mean" and len(tensors) < 256 else None)
    divisor = torch.zeros_like(sign) if aggregate != "sum" and count is None else None
    for w, d in zip(weights, tensors, strict=True):
        if w == 1.0:
            weighted = d  # d * 1.0 is d, bit for bit
        else:
            if weighted_buf is None:
                weighted_buf = torch.empty_like(sign)
            weighted = torch.mul(d, w, out=weighted_buf)
        torch.gt(torch.mul(weighted, sign, out=scratch), 0, out=agree)
        torch.logical_not(agree, out=disagree)
        merged.add_(scratch.copy_(weighted).masked_fill_(disagree, 0.0))  # where(agree, wt, 0)
        if count is not None:
            count.add_(agree.view(torch.uint8))
        elif aggregate == "mean":
            divisor += agree  # type: ignore[operator]
        elif aggregate == "weighted_mean":
            divisor += agree * w  # type: ignore[operator]
    if count is not None:
        # integer counts 0..K, exact in every float dtype: 0 (nobody agrees) becomes 1
        merged.div_(scratch.copy_(count).clamp_(min=1))
    elif aggregate != "sum":
        # ``== 0`` too: in float16 the literal 1e-12 rounds to 0, so ``< 1e-12`` alone misses
        # empty entries and 0/0 gives NaN
        empty = (divisor == 0) | (divisor.abs() < 1e-12)  # type: ignore[operator]
        divisor = torch.where(empty, torch.ones_like(divisor), divisor)  # type: ignore[arg-type]
        merged /= divisor
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
    sparsifier="magnitude",
))
