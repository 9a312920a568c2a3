"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit's ``karcher``; arXiv:2603.04972).

Each flattened tensor x_i is split into its norm |x_i| and direction u_i (computed in float32,
float64 for float64 inputs). Directions with |x_i| <= ``tol`` take no part in the mean. Starting
from the normalised average of the directions (u_1 if that is shorter than ``tol``), up to
``max_iter`` steps of

    g = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  theta_i = angle(m, u_i)
    m <- cos|g| m + sin|g| g / |g|,  renormalised

(directions closer than ``tol`` radians skipped; stop when |g| < ``tol``) give m, and the result
is mean_i(|x_i|) * m. All models count equally (a_i = 1/N). One model is returned as it is; if
every model is shorter than ``tol`` the result is zeros.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights; one or more models                           |
| weights             | none: a_i = 1/N                                            |
| base model          | not an input (list it under ``models`` to average it); config and tokenizer only |
| antipodal inputs    | the mean starts at the first direction (as mergekit)       |
| math dtype          | ``dtype`` (float32 default); norms in float32 (float64 for float64)         |
| operation order     | mergekit's                                                 |
| mergekit            | an unlisted ``base_model`` is one more input there, silently averaged in    |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param


def _norm(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(dtype))


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int,
                 tol: float) -> torch.Tensor:
    """The alpha-weighted Karcher mean direction of ``tensors`` times sum_i alpha_i |x_i|."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [_norm(x, dtype) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype)
             for x, n in zip(tensors, norms, strict=True)]
    live = [i for i, n in enumerate(norms) if n.item() > tol]
    if not live:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in live)
    a = [alphas[i] / total for i in live]
    u = [units[i] for i in live]

    mean = torch.zeros_like(u[0])
    for alpha, unit in zip(a, u, strict=True):
        mean += alpha * unit
    length = _norm(mean, dtype)
    mean = u[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for alpha, unit in zip(a, u, strict=True):
            cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
        length = _norm(step, dtype)
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (step / length)).to(mean.dtype)
        length = _norm(mean, dtype)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(alpha * n for alpha, n in zip(alphas, norms, strict=True))
    return scale * mean


def karcher(base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
            weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5
            ) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()  # the input may be the caller's own tensor
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter, tol)


METHODS.register(MergeMethod(
    name="karcher",
    func=karcher,
    space="weight",
    params=(
        Param("max_iter", 10, int, "most Riemannian gradient steps", low=0),
        Param("tol", 1e-5, float, "convergence tolerance (step length, angle and norm floor)",
              low=0.0),
    ),
    doc=__doc__ or "",
    requires_base=False,
    min_models=1,
    model_params=(),
    accepts_sparsify=False,
))
