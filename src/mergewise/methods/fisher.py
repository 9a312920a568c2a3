"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

Per parameter entry, θ* = Σ_k c_k (F_k + ε) θ_k / Σ_k c_k (F_k + ε), with F_k expert k's diagonal
Fisher on its own task's calibration data (``mergewise features``; label-free: the labels are
the model's own predictions, ``calibration.labels``, see below), ε = ``minimal_fisher_weight``
and c_k = λ_k (the per-model ``weight``), or with ``normalize`` (default, as FusionBench)
c_k = λ_k / (‖F_k‖ + ε), ‖F_k‖ the L2 norm of expert k's whole Fisher (every stored parameter),
so that a task whose gradients are larger overall does not win every entry. Full weights are
averaged: no base is needed, no task vectors.

- An expert without a Fisher for a tensor (no gradient reached it in that expert) counts
  nothing there; a tensor no expert has a Fisher for (buffers, a pooler the head never reads)
  is the plain weighted average Σ λ_k θ_k / Σ λ_k; so is every entry whose denominator is 0
  (ε = 0 and no Fisher mass there, or every λ_k 0 among the experts that have a Fisher).
- The Fisher, F = (1/P) Σ_predictions Σ_y w(y) (∇ log p(y|x))², the mean over predictions
  (classifier examples, or real tokens of a causal LM head) of per-prediction squared
  gradients: ``labels: expected`` (every class, weighted by p(y|x): the exact Fisher; the
  default ``auto`` for up to 64 classes), ``sample`` (one y ~ p(·|x), seeded; ``auto``
  above 64 classes: an LM), ``argmax`` (y = the prediction; biased, a common shortcut).

| question          | mergewise                                  | FusionBench (MergeLM's code)     |
|-------------------|--------------------------------------------|----------------------------------|
| Fisher of a batch | Σ of per-example squared gradients         | one batch gradient, squared (1)  |
| labels            | the model's own: expected/sample/argmax    | the model's own, √p-weighted (1) |
| empirical Fisher  | not offered (data labels are never read)   | not offered (regression: MSE)    |
| examples          | ``calibration.num_examples`` (64), seeded  | ``num_fisher_examples`` (256)    |
| LM / token heads  | every real token a prediction, pads masked | sequence classification only     |
| ε                 | ``minimal_fisher_weight`` 1e-6 on every F  | the same                         |
| normalize         | c_k ∝ λ_k/(‖F_k‖ + ε), over stored params  | the same, over merged params     |
| scaling           | per-model ``weight`` λ_k ≥ 0 (default 1)   | ``fisher_scaling_coefficients``  |
| no Fisher         | plain λ-weighted mean                      | every merged parameter has one   |
| storage           | float64 sums, float32 stats file           | in memory                        |
| math dtype        | float64, rounded once to ``dtype``         | model dtype                      |
| calibration       | ``labels``, ``pack``; ``accumulate``, ``blocks_per_pass`` refused | —         |

(1) FusionBench squares the gradient of Σ_i Σ_y √p(y|x_i) log p(y|x_i) over a whole batch, so
cross terms between the batch's examples and between classes stay in; its regression heads use
the MSE on data labels instead. Its examples are counted in whole batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import FeatureError, RecipeError
from ..features.fisherfile import FisherFeature
from ..features.statsfile import TensorFeature
from ..registry import METHODS, MergeMethod, Param

NORMALIZE = Param("normalize", True, bool, "divide each expert's Fisher by its whole-model L2 "
                  "norm (as FusionBench's normalize_fisher_weight)")
MINIMAL = Param("minimal_fisher_weight", 1e-6, float, "epsilon added to every Fisher entry "
                "(and to the norms): entries without Fisher mass average by the weights",
                low=0.0)
SCALE = Param("weight", 1.0, float, "per-model scaling coefficient lambda_k of its Fisher "
              "(FusionBench's fisher_scaling_coefficients)", low=0.0)


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ λ_k θ_k / Σ λ_k in float64 (the fallback of tensors and entries without Fisher)."""
    top = max(weights, default=0.0)
    if top <= 0:
        raise RecipeError("fisher: the model weights sum to 0; give at least one model a "
                          "weight > 0")
    relative = [w / top for w in weights]  # <= 1: huge weights cannot overflow the sum
    total = sum(relative)
    out = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t, w in zip(tensors, relative, strict=True):
        out.add_(t.to(torch.float64), alpha=w / total)
    return out


def fisher_merge(base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
                 weights: Sequence[float], *, features: Sequence[TensorFeature | None],
                 normalize: bool = True, minimal_fisher_weight: float = 1e-6,
                 name: str = "tensor") -> torch.Tensor:
    """The Fisher-weighted average of one tensor from the experts' full weights."""
    plain = weighted_mean(tensors, weights)
    eps = minimal_fisher_weight
    for f in features:
        if f is not None and (not isinstance(f, FisherFeature) or f.fisher is None):
            raise FeatureError(f"{name}: fisher merging needs Fisher statistics, got "
                               f"'{f.kind}' ones (a Gram stats file of LOT/RegMean?)")
    coefs = _coefficients(features, weights, normalize, eps)
    terms = [(t, f, c) for t, f, c in zip(tensors, features, coefs, strict=True) if c > 0]
    if not terms:
        return plain.to(tensors[0].dtype)

    def weight_of(f: TensorFeature, c: float, like: torch.Tensor) -> torch.Tensor:
        return (f.fisher.to(like.device, torch.float64) + eps).mul_(c)  # type: ignore[union-attr]

    den = torch.zeros_like(plain)
    for t, f, c in terms:
        den.add_(weight_of(f, c, t))
    seen = den > 0
    safe = torch.where(seen, den, 1.0)
    out = torch.zeros_like(plain)
    for t, f, c in terms:  # Σ (w_k / Σ w) θ_k: a convex combination, even for tiny weights
        out.add_(weight_of(f, c, t).div_(safe).mul_(t.to(torch.float64)))
    return torch.where(seen, out, plain).to(tensors[0].dtype)


def _coefficients(features: Sequence[TensorFeature | None], weights: Sequence[float],
                  normalize: bool, eps: float) -> list[float]:
    """c_k per expert (0 for one without a Fisher here), divided by the largest. The merge is
    invariant to a common factor of the c_k, so 1/(norm + eps) is taken relative to the
    smallest positive norm + eps: a tiny norm cannot overflow to inf (and the merge to NaN).
    With ``normalize``, an all-zero Fisher and eps 0, every (F + eps) is 0: it adds nothing."""
    fishers = [f if isinstance(f, FisherFeature) else None for f in features]
    if not normalize:
        cs = [lam if f is not None else 0.0 for f, lam in zip(fishers, weights, strict=True)]
    else:
        least = min((f.norm + eps for f in fishers if f is not None and f.norm + eps > 0),
                    default=1.0)
        cs = [lam * (least / (f.norm + eps)) if f is not None and f.norm + eps > 0 else 0.0
              for f, lam in zip(fishers, weights, strict=True)]
    top = max(cs, default=0.0)
    return [c / top for c in cs] if top > 0 else cs  # <= 1: (F + eps)·c cannot overflow


METHODS.register(MergeMethod(
    name="fisher",
    func=fisher_merge,
    space="weight",
    params=(NORMALIZE, MINIMAL),
    doc=__doc__ or "",
    requires_base=False,
    model_params=(SCALE,),
    accepts_sparsify=False,
    features=True,
    feature_stats="fisher",
    calibration_options=("labels", "pack"),
    calibration_why={
        "accumulate": "has no Gram: its per-parameter sums are always float64, stored float32",
        "blocks_per_pass": "has no Gram to stream: one backward pass per prediction reaches "
                           "every parameter at once"},
))
