"""Consensus Merging (Wang et al., ICML 2024): keep the entries at least k tasks' TALL masks claim.

1. tau_MTL and task t's TALL mask m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| exactly as in
   ``tall_masks`` (``tau_mtl`` sum or ties, ``mask_lambda`` per model, strict ``>``).
2. Consensus mask: count = sum_t m_t per entry; keep where count >= ``k`` (default 2, the
   official ``prun_thre_k``): k = 2 drops "selfish" entries (one task) and "catastrophic" ones
   (no task), k = 1 only the catastrophic, k = 0 keeps all (plain task arithmetic / TIES),
   k > number of tasks keeps none (the base).
3. theta = theta0 + lambda * (consensus mask * tau_MTL). The paper chooses lambda on
   validation from 0.1, 0.2, ..., 1.0; the default here is 1.0, as the other task-vector
   methods (give the value task arithmetic would use, typically 0.3-0.4 for 8 tasks).

The official code builds the masks over the whole flattened model; here every tensor is
masked on its own, which is the same thing (each mask is elementwise). The official Consensus
TIES variant loads its masks under a file name its TALL step does not write (a known bug);
here masks and tau_MTL always come from one construction.

| question            | mergewise                                                        |
|---------------------|------------------------------------------------------------------|
| multi-task vector   | ``tau_mtl``: sum (Consensus TA, default) or ties (Consensus TIES) |
| mask rule           | \\|tau_t\\| > lambda_t \\|tau_MTL - tau_t\\| (strict, official)   |
| lambda_t            | ``mask_lambda`` per model, default 0.6 (FusionBench; the paper's per-task validation pick) |
| consensus           | count of masks >= ``k`` (default 2)                              |
| TIES trim scope     | per tensor (the official top-20 % is model-wide)                 |
| global scale        | ``lambda`` 1.0 (paper: validation grid 0.1-1.0)                  |
| per-model weight    | none (the paper has none)                                        |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) before everything     |
| RNG                 | none (only a random sparsifier draws)                            |
| math dtype          | ``dtype`` (float32 default)                                      |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import LAMBDA, METHODS, MergeMethod, Param
from .tall_masks import MASK_LAMBDA, TAU_MTL, TIES_DENSITY, multi_task_vector, task_masks

K = Param("k", 2, int, "keep entries whose TALL masks are on for at least k tasks (official "
          "prun_thre_k 2; 0 keeps everything)", low=0)


def consensus_mask(tensors: Sequence[torch.Tensor], mtl: torch.Tensor,
                   mask_lambda: Sequence[float], k: int) -> torch.Tensor:
    """count_t(m_t) >= k, as a bool tensor."""
    count = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
    for m in task_masks(tensors, mtl, mask_lambda):
        count.add_(m)
    return count >= k


def consensus_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                    weights: Sequence[float], *, mask_lambda: Sequence[float], k: int = 2,
                    lam: float = 1.0, tau_mtl: str = "sum", ties_density: float = 0.2
                    ) -> torch.Tensor:
    """theta0 + lambda * (consensus mask * tau_MTL) for one tensor."""
    mtl = multi_task_vector(tensors, tau_mtl=tau_mtl, ties_density=ties_density)
    keep = consensus_mask(tensors, mtl, mask_lambda, k)
    merged = torch.where(keep, mtl, 0.0)
    return base + lam * merged


METHODS.register(MergeMethod(
    name="consensus",
    func=consensus_merge,
    space="delta",
    params=(LAMBDA, K, TAU_MTL, TIES_DENSITY),
    doc=__doc__ or "",
    model_params=(MASK_LAMBDA,),
))
