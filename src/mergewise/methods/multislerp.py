"""Multi-SLERP: weighted barycentric interpolation of any number of models on the hypersphere
(mergekit's ``multislerp``; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Per tensor, with x_i the flattened models (their task vectors x_i = theta_i - theta_0 when a base
is given) and w_i their weights (divided by their sum with ``normalize_weights``):

1. u_i = x_i / (|x_i| + eps);  m = sum_i w_i u_i, then m / |m|;
2. tangent vectors t_i = u_i - (u_i.m) m;  g = sum_i w_i t_i;  r = |g| + eps;
3. theta = (m cos r + g sin(r) / r) * sum_i w_i |x_i|  (+ theta_0 with a base).

One model is returned as it is. When |sum_i w_i u_i| < eps (antipodal inputs whose weights
cancel) two models fall back to the weighted sum w_0 x_0 + w_1 x_1 (+ base); more are an error.
A zero vector contributes its weight but no direction (two models, one zero: lerp).

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights, or task vectors when a base is given         |
| models              | one or more (the base is not one of them)                  |
| weights             | per-model ``weight``; ``normalize_weights`` divides by their sum |
| cancelling mean     | abs(sum_i w_i u_i) < eps: two models give the weighted sum, more an error;  |
|                     | rounding can leave exactly antipodal models a mean above eps (mergekit's test) |
| tangent step        | sum_i w_i t_i is 0 at the normalised mean, so the result is, up to rounding,  |
|                     | m * sum_i w_i abs(x_i) (mergekit's algorithm, kept)                          |
| math dtype          | ``dtype`` (float32 default), no upcast; weights in it too (mergekit) |
| mergekit            | weights summing to 0 with ``normalize_weights`` divide by 0 (inf/NaN); here an error |
| mergekit            | ``weight`` is required there; here it defaults to 1.0      |
| mergekit            | float16: eps = 1e-8 rounds to 0, so a zero tangent gives sin 0 / 0 = NaN; here |
|                     | eps is at least the dtype's smallest normal (6.1e-5 in float16)              |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import RecipeError
from ..registry import METHODS, WEIGHT, MergeMethod, Param

ZERO_SUM = 1e-12


def multislerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
               weights: Sequence[float], *, normalize_weights: bool = True, eps: float = 1e-8
               ) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()  # the input may be the caller's own tensor
    x = torch.stack(list(tensors), dim=0)
    # float16 rounds 1e-8 to 0 (then a zero tangent gives sin 0 / 0): at least its smallest normal
    eps = max(eps, torch.finfo(x.dtype).tiny)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(list(weights), dtype=x.dtype, device=x.device)
    if normalize_weights:
        total = w.sum()
        # 0 in exact arithmetic, or once the weights are rounded to the compute dtype
        if abs(sum(weights)) < ZERO_SUM or float(total) == 0.0:
            raise RecipeError(f"multislerp: the model weights {list(weights)} sum to 0; give "
                              "weights with a non-zero sum or set normalize_weights: false")
        w = w / total
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    length = torch.norm(mean)
    if length < eps:
        if x.shape[0] != 2:
            raise RecipeError(
                f"multislerp: the weighted mean of the {x.shape[0]} models' directions is 0 "
                "(antipodal models whose weights cancel); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out if base is None else out + base
    mean = mean / length
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    g = (tangents * w.view(-1, 1)).sum(0)
    r = torch.norm(g) + eps
    out = mean * torch.cos(r) + g * (torch.sin(r) / r)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base


METHODS.register(MergeMethod(
    name="multislerp",
    func=multislerp,
    space="weight",
    params=(
        Param("normalize_weights", True, bool, "divide the weights by their sum"),
        Param("eps", 1e-8, float, "numerical floor of the norms", low=0.0, low_open=True),
    ),
    doc=__doc__ or "",
    requires_base=False,
    uses_base=True,
    min_models=1,
    model_params=(WEIGHT,),
    accepts_sparsify=False,
))
