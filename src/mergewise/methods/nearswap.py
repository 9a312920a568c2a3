"""NearSwap: take the model's value where it is near the base, keep the base where it is far.

Per entry, with a = base and b = the one model (mergekit's ``nearswap``, after
alchemonaut's QuartetAnemoi merges):

    w = clamp(t / max(|a - b|, 1e-6), 0, 1);   theta = w * b + (1 - w) * a

Entries closer than ``t`` to the base become the model's value (w = 1); farther ones move
only t / |a - b| of the way, so large, model-specific changes are damped towards the base.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights; base + exactly one model                     |
| t                   | required, >= 0 (a distance in weight units)                |
| zero difference     | w = 1 (the distance is clamped to 1e-6 first, so no 0/0)   |
| math dtype          | ``dtype`` (float32 default), mergekit's operation order    |
| mergekit            | accepts t < 0, which gives w = 0, the base everywhere; here t < 0 is a recipe error |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param

MIN_DISTANCE = 1e-6


def nearswap(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
             *, t: float) -> torch.Tensor:
    (model,) = tensors
    distance = torch.abs(base - model).clamp(min=MIN_DISTANCE)
    w = (t / distance).clamp(min=0, max=1)
    return w * model + (1 - w) * base


METHODS.register(MergeMethod(
    name="nearswap",
    func=nearswap,
    space="weight",
    params=(Param("t", None, float, "distance below which an entry takes the model's value; "
                  "farther entries move t / |base - model| of the way", low=0.0, required=True),),
    doc=__doc__ or "",
    requires_base=True,
    uses_base=True,
    min_models=1,
    max_models=1,
    model_params=(),
    accepts_sparsify=False,
))
