"""Linear: weighted average of full weights (a model soup).

theta = sum_k w_k theta_k / sum_k w_k  (``normalize: true``, default), or sum_k w_k theta_k.
The base model, if given, is not part of the average (list it under ``models`` to include it);
it only supplies the config and tokenizer files.

| question            | mergewise                                   |
|---------------------|---------------------------------------------|
| space               | full weights (not task vectors)             |
| weights             | per-model ``weight`` (default 1.0)          |
| normalisation       | divide by sum of weights (``normalize``)    |
| sparsification      | none (works on weights, not deltas)         |
| math dtype          | float32 (float64 for float64 inputs), rounded once to ``dtype`` (mergekit) |
| weights summing to 0 | an error with ``normalize`` (mergekit divides: inf/NaN)    |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import RecipeError
from ..registry import METHODS, WEIGHT, MergeMethod, Param


def linear(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], weights: Sequence[float],
           *, normalize: bool = True) -> torch.Tensor:
    """As mergekit: float32 (float64 for float64 inputs) weights and sum, each model added by a
    fused multiply-add, divided by the float32 sum of the weights, rounded once to the dtype."""
    dtype = tensors[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=acc)
    out = torch.zeros(tensors[0].shape, dtype=acc, device=tensors[0].device)
    for t, wk in zip(tensors, w.tolist(), strict=True):
        out.add_(t, alpha=wk)
    if normalize:
        total = w.sum()
        if abs(float(total)) < 1e-12:
            raise RecipeError("linear: the model weights sum to 0; set normalize: false")
        out.div_(total.to(out.device))
    return out.to(dtype)


METHODS.register(MergeMethod(
    name="linear",
    func=linear,
    space="weight",
    params=(Param("normalize", True, bool, "divide by the sum of the model weights"),),
    doc=__doc__ or "",
    elementwise=True,
    sparsifier=None,
    requires_base=False,
    model_params=(WEIGHT,),
    accepts_sparsify=False,
))
