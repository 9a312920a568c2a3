"""EMR-Merging (Huang et al. 2024): elect, mask, rescale; one model per task, no hyperparameters.

1. Elect: sign = sign(sum_t tau_t) per entry, summed in model order in ``dtype``; an exact 0
   sum elects - (the official ``(x > 0) * 2 - 1``). FusionBench sums too; the official code
   takes the mean, which has the same sign except where sum / K underflows to 0.
2. Mask: M_t = (tau_t * sign > 0): entries of task t that agree with the elected sign and are
   non-zero (so where the vectors cancel to 0, only the negative entries are kept).
3. Unified vector: tau_uni = sign * max_t |M_t * tau_t| (0 where no task agrees).
4. Rescale: lambda_t = sum_i mean|tau_t,i| / sum_i mean|M_t,i * tau_uni,i| over every merged
   tensor i (a sum of per-tensor means, as the official code; means in float64). A zero
   denominator (no entry of task t survives anywhere; the official code gives inf or NaN)
   gives lambda_t = 1: that task's model is then the base.
5. Task t's model: theta_t = theta0 + lambda_t * (M_t * tau_uni), assembled by
   ``mergewise materialize`` or ``merge_task_state_dicts``; never a single merged model.

``mergewise merge`` writes the unified model theta0 + tau_uni (a normal checkpoint, usable on
its own) and ``modulators.safetensors``: per task and tensor the mask packed 1 bit per entry, the
rescalers and the task names (format in ``mergewise.modulators``). tau_uni is what the unified
checkpoint stores, unified - theta0 in ``dtype``: with ``out_dtype`` narrower than ``dtype`` it
carries that rounding, and lambda_t is computed from the same stored values, so materialized
weights equal the formula exactly.

| question            | mergewise                                                     |
|---------------------|---------------------------------------------------------------|
| trim scope          | none (a ``sparsify:`` block, e.g. TADrop, runs before the vote) |
| sign election input | sparsified task vectors; sum; 0 counts as - (official)        |
| aggregation         | max \\|tau\\| over agreeing tasks (unified), mask per task    |
| global scale        | per task: lambda_t = sum of per-tensor mean ratios (official) |
| rescale             | lambda_t uses the sparsified tau_t (what EMR is given)        |
| per-model weight    | none (the paper has none)                                     |
| RNG                 | none (only a random sparsifier draws)                         |
| math dtype          | ``dtype`` (float32 default); means in float64                 |
| all-zero tensors    | written as the base; every mask bit 0                         |
| integer buffers     | copied from the base; no mask                                 |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..numerics import weighted_sum
from ..registry import METHODS, MergeMethod, TaskSpecificOutput


@dataclass
class EMRTensor:
    """EMR's per-task data for one tensor: masks M_t and mean|tau_t| (the rescaler numerators;
    None for a method without rescalers, TALL masks: every lambda_t is then 1)."""

    masks: list[torch.Tensor]
    abs_means: list[float] | None


def elect_sign(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """+1 where the sum of the task vectors is > 0, -1 elsewhere (an exact 0 counts as -)."""
    total = weighted_sum(tensors)
    return torch.where(total > 0, 1.0, -1.0).to(total.dtype)


def emr_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]
              ) -> TaskSpecificOutput:
    """Unified weights theta0 + tau_uni, and each task's mask and mean|tau_t| for this tensor."""
    sign = elect_sign(tensors)
    magnitude = torch.zeros_like(sign)
    masks, abs_means = [], []
    for d in tensors:
        mask = (d * sign) > 0
        magnitude = torch.maximum(magnitude, torch.where(mask, d.abs(), 0.0))
        masks.append(mask)
        abs_means.append(float(d.abs().mean(dtype=torch.float64)) if d.numel() else 0.0)
    return TaskSpecificOutput(merged=base + magnitude * sign,
                              modulators=EMRTensor(masks, abs_means))


def rescalers(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """lambda_t = numerator / denominator, and 1.0 where the denominator is 0 (nothing kept)."""
    return [n / d if d > 0 else 1.0 for n, d in zip(numerators, denominators, strict=True)]


def assemble(base: torch.Tensor, unified: torch.Tensor, mask: torch.Tensor,
             rescaler: float) -> torch.Tensor:
    """theta0 + lambda_t * (M_t * tau_uni), with tau_uni = unified - theta0 (``base``'s dtype)."""
    tau = unified.to(device=base.device, dtype=base.dtype) - base
    return base + tau.mul_(mask.to(tau.device)).mul_(rescaler)


METHODS.register(MergeMethod(
    name="emr",
    func=emr_merge,
    space="delta",
    params=(),
    doc=__doc__ or "",
    model_params=(),
    task_specific=True,
))
