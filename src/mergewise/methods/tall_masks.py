"""TALL masks (Wang et al., ICML 2024, "Localizing Task Information"): one model per task.

1. Multi-task vector tau_MTL (``tau_mtl``): ``sum`` = sum_t tau_t (task arithmetic, no
   scaling; the official ``use_ties: false``, default), or ``ties`` = TIES with each task vector
   trimmed to its top ``ties_density`` (0.2) by |tau|, sign elected by the sum, disjoint **sum**
   (the official ``ties_merging(reset_thresh=20, merge_func="dis-sum")``).
2. Task t's mask, entry by entry: m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| (strict ``>``,
   as the official ``generate_task_masks``; an entry where tau_t and tau_MTL are both 0 is off),
   computed from the untrimmed tau_t (the official code trims only inside TIES).
   ``mask_lambda`` is lambda_t, per model; the paper picks it per task from
   {0.2, 0.3, 0.4, 0.5, 0.6} by that task's validation accuracy (data mergewise does not
   have), FusionBench uses one 0.6 for every task (the default here).
3. Task t's model: theta_t = theta0 + m_t * tau_MTL (coefficient 1, as the official code).

``mergewise merge`` writes the unified model theta0 + tau_MTL and ``modulators.safetensors``
(EMR's format: the masks packed 1 bit per entry, every rescaler 1.0); ``mergewise materialize``
assembles a task's model. Every floating-point tensor is masked (the official code flattens
the whole model). FusionBench's port computes |theta0 - tau_t| on the left (theta0 where 0
belongs); that is not followed here. ``consensus`` merges these masks into one model.

| question            | mergewise                                                        |
|---------------------|------------------------------------------------------------------|
| multi-task vector   | ``tau_mtl``: sum (default) or ties (top 0.2 per tensor, dis-sum) |
| mask rule           | \\|tau_t\\| > lambda_t \\|tau_MTL - tau_t\\| (strict, official)   |
| lambda_t            | ``mask_lambda`` per model, default 0.6 (FusionBench; the paper's grid 0.2-0.6 by validation) |
| TIES trim scope     | per tensor (the official top-20 % is model-wide)                 |
| TIES 0-sum sign     | + (mergewise's TIES; the official code takes the global majority) |
| task model          | theta0 + m_t * tau_MTL (rescaler 1)                              |
| per-model weight    | none (the paper has none)                                        |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) before everything     |
| RNG                 | none (only a random sparsifier draws)                            |
| math dtype          | ``dtype`` (float32 default)                                      |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import weighted_sum
from ..registry import METHODS, MergeMethod, Param, TaskSpecificOutput
from ..sparsify.magnitude import magnitude
from .emr import EMRTensor
from .ties import ties_merge

MASK_LAMBDA = Param("mask_lambda", 0.6, float, "lambda_t of the task's mask |tau_t| > lambda_t "
                    "|tau_MTL - tau_t| (paper: per task from 0.2-0.6 on validation; "
                    "FusionBench 0.6)", low=0.0)
TAU_MTL = Param("tau_mtl", "sum", str, "multi-task vector the masks compare with: sum "
                "(task arithmetic) or ties (trim, elect, disjoint sum)", choices=("sum", "ties"))
TIES_DENSITY = Param("ties_density", 0.2, float, "tau_mtl: ties only: fraction of each task "
                     "vector TIES keeps (the paper's top 20 %)", low=0.0, high=1.0,
                     low_open=True)


def multi_task_vector(tensors: Sequence[torch.Tensor], *, tau_mtl: str = "sum",
                      ties_density: float = 0.2) -> torch.Tensor:
    """tau_MTL of one tensor: the sum, or TIES (top ``ties_density``, elect, disjoint sum)."""
    if tau_mtl == "sum":
        return weighted_sum(tensors)
    trimmed = [magnitude(t, density=ties_density) for t in tensors]
    return ties_merge(torch.zeros_like(tensors[0]), trimmed, [1.0] * len(tensors),
                      aggregate="sum")


def task_masks(tensors: Sequence[torch.Tensor], mtl: torch.Tensor,
               mask_lambda: Sequence[float]) -> list[torch.Tensor]:
    """m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| (bool), per task."""
    return [t.abs() > (mtl - t).abs_().mul_(lam)
            for t, lam in zip(tensors, mask_lambda, strict=True)]


def tall_masks_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     weights: Sequence[float], *, mask_lambda: Sequence[float],
                     tau_mtl: str = "sum", ties_density: float = 0.2) -> TaskSpecificOutput:
    """Unified weights theta0 + tau_MTL and each task's TALL mask for this tensor."""
    mtl = multi_task_vector(tensors, tau_mtl=tau_mtl, ties_density=ties_density)
    masks = task_masks(tensors, mtl, mask_lambda)
    return TaskSpecificOutput(merged=base + mtl, modulators=EMRTensor(masks, None))


METHODS.register(MergeMethod(
    name="tall_masks",
    func=tall_masks_merge,
    space="delta",
    params=(TAU_MTL, TIES_DENSITY),
    doc=__doc__ or "",
    model_params=(MASK_LAMBDA,),
    task_specific=True,
))
