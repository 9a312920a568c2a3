"""NuSLERP: spherical interpolation of two models with weights instead of ``t``, optionally of
their task vectors, per tensor or per row (mergekit's ``nuslerp``).

t = w_1 / (w_0 + w_1) from the two models' ``weight``s (equal weights: t = 1/2). Without a base
the models' weights v_0, v_1 are interpolated; with a base, their task vectors v_i = theta_i -
theta_0, and the base is added back. With u_i = v_i / max(|v_i|, 1e-7), cos = u_0.u_1 clamped
to [-1, 1] and Omega = acos(cos):

    slerp = (sin((1 - t) Omega) v_0 + sin(t Omega) v_1) / sin Omega

falling back to lerp (1 - t) v_0 + t v_1 where the vectors are colinear (1 - cos^2 <= 1e-16),
nearly antipodal (cos < -0.9995, slerp's threshold) or one of them is all zero.
``nuslerp_flatten: true`` (default) treats the tensor as one vector; ``false`` interpolates each
row (last dimension) separately, and ``nuslerp_row_wise: true`` with it each column (vectors
along the first dimension).

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights, or task vectors when a base is given         |
| models              | exactly two (the base is not one of them)                  |
| t                   | w_1 / (w_0 + w_1); weights summing to 0 are a recipe error |
| colinear fallback   | lerp where 1 - cos^2 <= 1e-16 (exactly parallel in float32); near it the  |
|                     | spherical formula is well conditioned (mergekit's rule)                     |
| antipodal fallback  | lerp where cos < -0.9995 (``slerp``'s threshold)                           |
| zero vector         | lerp (the angle is undefined)                              |
| math dtype          | ``dtype`` (float32 default), no upcast, mergekit's operation order |
| mergekit            | weights summing to abs below 1e-6 give t = 1/2 there; here a one-line error    |
| mergekit            | antipodal vectors lerp only at exactly 1 - cos^2 <= 1e-16: rounding leaves an  |
|                     | angle of about 3e-4 from pi in float32 and 1 / sin Omega magnifies the noise   |
|                     | (t = 1/2 of [1, 2] and [-2, -4] gives [-2895, -5791] there, [-0.5, -1] here)   |
| mergekit            | an all-zero vector (with a base: a tensor one model left untouched) is slerped at |
|                     | Omega = pi/2 there, giving sin(t pi/2) times the other vector instead of t  |
| mergekit            | ``weight`` is required there; here it defaults to 1.0 (t = 1/2) |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import RecipeError
from ..registry import METHODS, WEIGHT, MergeMethod, Param
from .slerp import DOT_THRESHOLD

UNIT_FLOOR = 1e-7
COLINEAR = 1e-8 ** 2
ZERO_SUM = 1e-6


def interpolation_factor(weights: Sequence[float]) -> float:
    w0, w1 = weights
    total = w0 + w1
    if abs(total) < ZERO_SUM:
        raise RecipeError(f"nuslerp: the two model weights ({w0:g}, {w1:g}) sum to 0, so "
                          "t = w1 / (w0 + w1) is undefined; give weights with a non-zero sum")
    return w1 / total


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True,
                    row_wise: bool = False) -> torch.Tensor:
    """Slerp of v0 -> v1 at t along the last dimension (the whole tensor with ``flatten``; the
    first dimension with ``row_wise``), lerp where colinear, nearly antipodal or zero."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0 = torch.norm(v0, dim=-1, keepdim=True)
    n1 = torch.norm(v1, dim=-1, keepdim=True)
    u0 = v0 / n0.clamp(min=UNIT_FLOOR)
    u1 = v1 / n1.clamp(min=UNIT_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    linear = ((1 - cos.square()) <= COLINEAR) | (cos < -DOT_THRESHOLD) | (n0 == 0) | (n1 == 0)
    # the spherical branch stays finite where it is not used (theta = 0 would divide by 0)
    theta = torch.acos(torch.where(linear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(linear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], weights: Sequence[float],
            *, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> torch.Tensor:
    t = interpolation_factor(weights)
    a, b = tensors
    if base is None:
        return nuslerp_vectors(t, a, b, flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    return base + nuslerp_vectors(t, a - base, b - base, flatten=nuslerp_flatten,
                                  row_wise=nuslerp_row_wise)


METHODS.register(MergeMethod(
    name="nuslerp",
    func=nuslerp,
    space="weight",
    params=(
        Param("nuslerp_flatten", True, bool, "interpolate the whole tensor as one vector "
              "(false: each row separately)"),
        Param("nuslerp_row_wise", False, bool, "with nuslerp_flatten false: interpolate "
              "column vectors (along the first dimension) instead of rows"),
    ),
    doc=__doc__ or "",
    requires_base=False,
    uses_base=True,
    min_models=2,
    max_models=2,
    model_params=(WEIGHT,),
    accepts_sparsify=False,
))
