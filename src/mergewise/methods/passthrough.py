"""Passthrough: copy one model's tensors unchanged, or times its ``scale`` (mergekit's
``passthrough``, the building block of layer-stacking "frankenmerges").

theta = theta_1, or scale_1 * theta_1 when the model's ``scale`` is given.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights                                               |
| models              | exactly one                                                |
| scale               | per-model ``scale``, a float times the tensor (default none: the tensor as it is) |
| base model          | not an input; it only supplies the config and tokenizer files |
| math dtype          | ``dtype`` (float32 default), written in ``out_dtype``      |
| mergekit            | a ``base_model`` is a second input there, refused (one input at most); here the |
|                     | base is never an input                                                      |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param

SCALE = Param("scale", None, float, "factor on this model's tensors (none: copied as they are)")


def passthrough(base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
                weights: Sequence[float], *, scale: Sequence[float | None] | None = None
                ) -> torch.Tensor:
    (tensor,) = tensors
    factor = scale[0] if scale is not None else None
    # a copy: the input may be the caller's own tensor (an in-memory state dict)
    return tensor.clone() if factor is None else tensor * factor


METHODS.register(MergeMethod(
    name="passthrough",
    func=passthrough,
    space="weight",
    params=(),
    doc=__doc__ or "",
    requires_base=False,
    min_models=1,
    max_models=1,
    model_params=(SCALE,),
    accepts_sparsify=False,
))
