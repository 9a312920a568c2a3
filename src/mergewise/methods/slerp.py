"""SLERP: spherical interpolation between exactly two models, per tensor (mergekit's ``slerp``).

theta = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω the angle between the flattened tensors
a and b. As mergekit: the norms are norms of the norms of 1M-entry chunks, a norm at most 1e-8
counts as 1 (so a zero tensor sits at 90° from the other), the cosine is the sum over chunks of
the normalised products, clamped to [-1, 1]; nearly colinear or antipodal tensors
(|cos Ω| > 0.9995) fall back to linear interpolation (1-t)·a + t·b; everything in float32
(float64 for float64 inputs). ``t = 0`` gives the first model (the base model when there is
one), ``t = 1`` the second. ``t`` may be given per tensor (filters) and over depth (gradients).

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights                                               |
| models              | exactly two; with a base: the base (t = 0) and one model   |
| colinear fallback   | lerp when abs(cos) > 0.9995                                |
| zero tensor         | norm taken as 1: the spherical formula at 90° (mergekit)   |
| math dtype          | float32, float64 for float64 inputs (mergekit), chunks of 2^20 |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
CHUNK = 1 << 20  # entries per chunk of the norm and dot reductions (mergekit's)


def _chunks(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [x[i:i + CHUNK].to(dtype) for i in range(0, x.numel(), CHUNK)]


def _norm(parts: list[torch.Tensor]) -> torch.Tensor:
    """The norm of the chunks' norms; at most NORM_EPS counts as 1."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in parts]))
    return torch.where(norm > NORM_EPS, norm, 1)


def slerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], weights: Sequence[float],
          *, t: float = 0.5) -> torch.Tensor:
    v0, v1 = tensors
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1), v1.reshape(-1)
    tt = torch.tensor(t, dtype=dtype, device=v0.device)
    if a.numel() == 0:
        return ((1 - tt) * a.to(dtype) + tt * b.to(dtype)).reshape(v0.shape).to(v0.dtype)
    pa, pb = _chunks(a, dtype), _chunks(b, dtype)
    na, nb = _norm(pa), _norm(pb)
    dot = torch.stack([((x / na) * (y / nb)).sum() for x, y in zip(pa, pb, strict=True)]).sum()
    dot = dot.clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        out[i * CHUNK:i * CHUNK + x.numel()] = ca * x + cb * y
    return out.reshape(v0.shape)


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
