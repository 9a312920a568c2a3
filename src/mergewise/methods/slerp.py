"""SLERP: spherical interpolation between exactly two models, per tensor.

theta = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω the angle between the flattened tensors
a and b (computed on normalised copies, in float64). When the tensors are nearly colinear
(|cos Ω| > 0.9995) or one is all zero, it falls back to linear interpolation (1-t)·a + t·b, as
mergekit does. ``t = 0`` gives the first model (the base model, if ``base_model`` is one of the
two), ``t = 1`` the second. ``t`` may be given per tensor-name pattern.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights                                               |
| models              | exactly two                                                |
| colinear fallback   | lerp when abs(cos) > 0.9995 or a norm is 0                 |
| math dtype          | ``dtype`` (float32 default); angle in float64              |
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param

DOT_THRESHOLD = 0.9995


def slerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], weights: Sequence[float],
          *, t: float = 0.5) -> torch.Tensor:
    a, b = tensors
    na = float(torch.linalg.vector_norm(a.double()))
    nb = float(torch.linalg.vector_norm(b.double()))
    if na == 0.0 or nb == 0.0:
        return torch.lerp(a, b, t)
    cos = float((a.double() * b.double()).sum()) / (na * nb)
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > DOT_THRESHOLD:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    s = math.sin(omega)
    return a * (math.sin((1 - t) * omega) / s) + b * (math.sin(t * omega) / s)


METHODS.register(MergeMethod(
    name="slerp",
    func=slerp,
    space="weight",
    params=(Param("t", 0.5, float, "interpolation factor: 0 = first model, 1 = second",
                  low=0.0, high=1.0),),
    doc=__doc__ or "",
    sparsifier=None,
    requires_base=False,
    min_models=2,
    max_models=2,
    model_params=(),
    accepts_sparsify=False,
))
