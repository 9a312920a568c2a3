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
| math dtype          | ``dtype`` (float32 default), written in ``out_dtype`` |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import divide_by_weight_sum, weighted_sum
from ..registry import METHODS, WEIGHT, MergeMethod, Param


def linear(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], weights: Sequence[float],
           *, normalize: bool = True) -> torch.Tensor:
    out = weighted_sum(tensors, weights)
    return divide_by_weight_sum(out, weights, "linear") if normalize else out


METHODS.register(MergeMethod(
    name="linear",
    func=linear,
    space="weight",
    params=(Param("normalize", True, bool, "divide by the sum of the model weights"),),
    doc=__doc__ or "",
    sparsifier=None,
    requires_base=False,
    model_params=(WEIGHT,),
    accepts_sparsify=False,
))
