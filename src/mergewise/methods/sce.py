"""SCE (Select, Calculate, Erase; Wan et al. 2024, FuseChat, arXiv:2408.07990): keep the entries
where the task vectors disagree most, weight each task by its energy, merge the entries that
agree with the elected sign (mergekit's ``sce``).

With tau_1..tau_N the task vectors of one tensor:

1. Select (``select_topk`` < 1): keep, in every tau_k, the entries with the largest variance
   across the tasks (population variance), round-half-up(select_topk x #(variance > 0)) of them;
   the rest become 0 in every task vector.
2. Calculate: w_k = mean(tau_k^2) / sum_j mean(tau_j^2) (1/N each if every tau is 0).
3. Erase: elect sign(sum_k tau_k) per entry (a 0 sum counts as +); only non-zero entries with
   that sign count. theta = theta0 + sum_k w_k e_k tau_k / max(sum_k w_k e_k, 1e-6).

A ``sparsify:`` block (e.g. TADrop) runs on each task vector before the select step.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| select count        | round-half-up(select_topk x #(variance > 0)), at least 1; ties by index     |
| select_topk         | in (0, 1]; 1 = no selection; < 1 needs two or more models  |
| task weights        | mean(tau^2), normalised by their sum                       |
| sign election       | sum of the selected task vectors; 0 counts as +; zero entries never agree |
| per-model weight    | none (the weights are calculated)                          |
| int8_mask           | accepted, no effect (mergekit's only changes intermediate dtypes) |
| math dtype          | ``dtype`` (float32 default), mergekit's operation order    |
| mergekit            | k = int(select_topk x count) (truncation, 0 keeps nothing), ties by ``torch.topk`` |
| mergekit            | uniform weights 1/N whenever sum_j mean(tau_j^2) < 1e-6, which real fine-tunes  |
|                     | (abs(tau) about 1e-4) reach, so its weighting depends on the tensor's scale;    |
|                     | here uniform only when that sum is 0                                        |
| mergekit            | select_topk <= 0 keeps nothing (the base), > 1 selects all, and one model with  |
|                     | select_topk < 1 keeps nothing (its variance is 0); here these are errors    |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import RecipeError
from ..registry import INT8_MASK, METHODS, MergeMethod, Param
from ..selection import keep_count, topk_mask

DIVISOR_FLOOR = 1e-6


def select_mask(tv: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries (one mask for every task) with the largest variance across the tasks."""
    var = torch.var(tv, dim=0, unbiased=False)
    return topk_mask(var, keep_count(select_topk, int(torch.count_nonzero(var))))


def task_weights(tv: torch.Tensor) -> torch.Tensor:
    """mean(tau_k^2) of each task over the sum of them (1/N each when the sum is 0)."""
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if total == 0.0:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
        select_topk: float = 1.0, int8_mask: bool = False) -> torch.Tensor:
    if select_topk < 1.0 and len(tensors) < 2:
        raise RecipeError("sce: select_topk < 1 keeps the entries whose task vectors differ "
                          "most, which needs two or more models (one model's variance is 0)")
    tv = torch.stack(list(tensors), dim=0)
    if select_topk < 1.0:
        tv = tv * select_mask(tv, select_topk).unsqueeze(0)
    majority = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    agree = tv.sign() == majority
    w = task_weights(tv).view(-1, *([1] * (tv.dim() - 1)))
    erased = w * agree
    merged = (tv * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=DIVISOR_FLOOR)


METHODS.register(MergeMethod(
    name="sce",
    func=sce,
    space="delta",
    params=(
        Param("select_topk", 1.0, float, "fraction of the entries with non-zero variance across "
              "the tasks that are kept (1.0: no selection)", low=0.0, high=1.0, low_open=True),
        INT8_MASK,
    ),
    doc=__doc__ or "",
    sparsifier=None,
    model_params=(),
))
