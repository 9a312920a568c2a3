"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572): mergekit's ``ram`` and
``ramplus_tl``, per tensor.

An entry of task vector k counts as a contribution when |tau_k| > ``epsilon``. Entries only one
model contributes to keep that model's value (no averaging down by the models that left the
entry alone); entries several models contribute to take the mean of the contributions:
theta = theta0 + sum_k [tau_k if only k contributes] + [tau_k / count if several do], each
model's term formed and then summed in model order, as mergekit. RAM+ (tensor-local) also
scales model k's unique entries by lambda_k = 1 + r * clip(shared_k / unique_k, 0, alpha), where
shared_k / unique_k are how many of k's contributions are shared / unique in this tensor.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| contribution        | abs(tau) > ``epsilon`` (1e-5)                              |
| unique entries      | kept as is (RAM), x lambda_k (RAM+: ``r`` 0.1, ``alpha`` 0.2) |
| shared entries      | mean over the contributing models                          |
| weights, lambda     | none (as mergekit)                                         |
| sparsify            | a ``sparsify:`` block runs first (e.g. TADrop)             |
| math dtype          | ``dtype`` (float32 default)                                |
| mergekit            | RAM+ returns float32 for half inputs; mergewise the compute dtype |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param

EPSILON = Param("epsilon", 1e-5, float, "a task-vector entry counts as a contribution when "
                "its magnitude exceeds this", low=0.0)


def _contributions(tensors: Sequence[torch.Tensor], epsilon: float
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked task vectors, contribution count, unique mask, shared mask)."""
    masks = [d.abs() > epsilon for d in tensors]
    count = torch.zeros(tensors[0].shape, dtype=torch.int64, device=tensors[0].device)
    for m in masks:
        count += m
    masked = [d * m for d, m in zip(tensors, masks, strict=True)]
    return masked, count, count == 1, count > 1


def ram_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
              epsilon: float = 1e-5) -> torch.Tensor:
    masked, count, unique, shared = _contributions(tensors, epsilon)
    divisor = count.clamp(min=1)
    merged = torch.zeros_like(base)
    for d in masked:
        merged += d * unique + d * shared / divisor
    return base + merged


def ramplus_tl_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     weights: Sequence[float], *, r: float = 0.1, alpha: float = 0.2,
                     epsilon: float = 1e-5) -> torch.Tensor:
    masked, count, unique, shared = _contributions(tensors, epsilon)
    divisor = count.clamp(min=1)
    merged = torch.zeros_like(base)
    for d, raw in zip(masked, tensors, strict=True):
        contributes = raw.abs() > epsilon
        # counts and lambda_k as float32 tensors, as mergekit computes them
        n_shared = (contributes & shared).sum().to(torch.float32)
        n_unique = (contributes & unique).sum().to(torch.float32)
        lam = 1 + r * (n_shared / n_unique.clamp(min=epsilon)).clamp(min=0, max=alpha)
        merged += d * unique * lam.to(d.device) + d * shared / divisor
    return base + merged


METHODS.register(MergeMethod(
    name="ram",
    func=ram_merge,
    space="delta",
    params=(EPSILON,),
    doc=__doc__ or "",
    model_params=(),
))

METHODS.register(MergeMethod(
    name="ramplus_tl",
    func=ramplus_tl_merge,
    space="delta",
    params=(Param("r", 0.1, float, "strength of the unique entries' boost", low=0.0),
            Param("alpha", 0.2, float, "cap of the shared/unique ratio in the boost", low=0.0),
            EPSILON),
    doc=__doc__ or "",
    model_params=(),
))
