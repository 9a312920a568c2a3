"""LOT Merging (Sun et al. 2025): per-unit closed forms that minimise feature drift.

For every unit, T* minimises Σ_k ||f(X_k; θ0 + T) − f(X_k; θ0 + T_k)||² where X_k is the unit's
input as computed by expert k on its own calibration data (``mergewise features``), then
θ = θ0 + λ·T*. Three kinds of units, told apart by the statistics of the parameter's layer:

- matmul (``nn.Linear``/``Conv2d``/``Conv1D`` weight): T* = (Σ_k T_k G_k)(Σ_k G_k)^† in torch's
  (out, in) layout, G_k = Σ xᵀx (raw sums: tasks weigh by their row count, as in the paper).
  † is the Hermitian pseudo-inverse: eigen-directions of Σ G_k below ``rtol`` × the largest
  eigenvalue count as null, and there the base is kept. A fused projection (one Linear feeding
  Q, K and V) is one unit with one Gram: no special case. Separate projections of one input
  (q/k/v, gate/up) share one stored Gram, so (Σ_k G_k)^† is computed once for all of them
  (``SharedSolves``): the same numbers as one solve each.
- scale (LayerNorm/RMSNorm weight): T*[d] = Σ_k s_k[d] T_k[d] / Σ_k s_k[d], s_k = Σ x̂² of the
  normalized input; dimensions with Σ_k s_k[d] = 0 take the mean of the T_k.
- shift (Linear/conv bias, norm bias): T* = Σ_k n_k T_k / Σ_k n_k (n_k rows).

With ``tasks: equal`` every G_k, s_k is divided by its row count n_k first and the bias mean is
unweighted, so a task with long texts does not outweigh one with short texts (the paper's raw
sums, ``tasks: rows``, are the default). An expert without statistics for a layer (it never ran
there) contributes nothing to that unit.
Parameters of no unit (embeddings, position tables, heads, layers no expert ran) follow
``fallback``: ``mean`` of the task vectors (default), or ``base`` (keep θ0, as the paper's
ablation does for units it does not merge). The solve runs in float64.

| question            | mergewise                                                      |
|---------------------|----------------------------------------------------------------|
| data                | per task: ``calibration:`` block (64 examples) or ``features:`` file |
| LLM-scale capture   | ``pack: true``, ``accumulate: float32``, ``blocks_per_pass: N``  |
| shared inputs       | q/k/v and gate/up: one stored Gram, one pseudo-inverse              |
| features from       | each expert on its own task's data (never the merged model)     |
| rows                | every token; padded tokens excluded via ``attention_mask``      |
| Gram normalisation  | none (raw Σ xᵀx per task); ``tasks: equal`` divides by n_k      |
| pseudo-inverse      | Hermitian, eigenvalues below ``rtol`` × max dropped (1e-6)     |
| other parameters    | ``fallback``: mean of task vectors (default) or base            |
| global scale        | ``lambda`` 1.0 on the whole T*                                  |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) on the task vectors |
| math dtype          | float64 for the solve, ``dtype`` elsewhere                      |
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import FeatureError
from ..features.statsfile import TensorFeature
from ..numerics import weighted_sum
from ..registry import LAMBDA, METHODS, MergeMethod, Param

RTOL = Param("rtol", 1e-6, float, "pseudo-inverse cut-off: eigenvalues of the summed Gram below "
             "rtol x the largest count as null", low=0.0, high=1.0, high_open=True)
TASKS = Param("tasks", "rows", str, "rows: raw sums, a task weighs by its row (token) count, "
              "as the paper; equal: each task's statistics divided by its row count",
              choices=("rows", "equal"))
# the calibration options of the Gram capture (``features.capture``, ``features.streaming``)
GRAM_OPTIONS = ("pack", "accumulate", "blocks_per_pass")
GRAM_WHY = {"labels": "captures layer-input Grams, not a Fisher"}
FALLBACK = Param("fallback", "mean", str, "parameters with no statistics (embeddings, heads): "
                 "mean of task vectors, or keep the base", choices=("mean", "base"))


def feature_kind(features: Sequence[TensorFeature | None], name: str = "tensor") -> str | None:
    """The unit kind the experts' statistics agree on, or None when no expert has any."""
    kinds = {f.kind for f in features if f is not None}
    if len(kinds) > 1:
        raise FeatureError(f"{name}: the experts' statistics disagree on what this tensor is "
                           f"({', '.join(sorted(kinds))}); were they captured from one architecture?")
    return next(iter(kinds), None)


def as_matrix(t: torch.Tensor, feature: TensorFeature) -> torch.Tensor:
    """The (out, in) float64 matrix of a weight: conv kernels flattened, (in, out) transposed."""
    t64 = t.to(torch.float64)
    return t64.T if feature.in_out else t64.reshape(t.shape[0], -1)


def from_matrix(m: torch.Tensor, like: torch.Tensor, feature: TensorFeature) -> torch.Tensor:
    return (m.T if feature.in_out else m).reshape(like.shape).to(like.dtype).contiguous()


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return weighted_sum(tensors).div_(len(tensors))


def with_stats(tensors: Sequence[torch.Tensor], features: Sequence[TensorFeature | None],
               per_row: bool = False) -> list[tuple[torch.Tensor, TensorFeature, float]]:
    """(tensor, statistics, weight) of the experts that have rows here; the weight is 1/rows
    when ``per_row`` (every task weighs the same), else 1."""
    return [(t, f, 1.0 / f.rows if per_row else 1.0)
            for t, f in zip(tensors, features, strict=True) if f is not None and f.rows > 0]


def stat(a: torch.Tensor, like: torch.Tensor, weight: float) -> torch.Tensor:
    """A statistic in float64 on ``like``'s device, times ``weight``. May be the stored tensor
    itself: never modify it in place. One expert's statistic is moved at a time."""
    a = a.to(like.device, torch.float64)
    return a if weight == 1.0 else a * weight


def accumulate(total: torch.Tensor | None, term: torch.Tensor, fresh: bool = False
               ) -> torch.Tensor:
    """total + term, in place after the first term, which is copied unless ``fresh`` (a new
    result nobody else holds): it may be the stored statistic itself."""
    if total is None:
        return term if fresh else term.clone()
    return total.add_(term)


class SharedSolves:
    """Factorisations of a summed Gram that several tensors share (q/k/v, gate/up): built for
    the first such tensor, reused by the others, so a layer needs 2 solves instead of 5.

    Keyed by the solve settings and the experts' Gram objects (a ``FeatureStats`` hands every
    layer of a group the very same tensor, ``TensorFeature.shared_gram``) held weakly: an entry
    goes when its first Gram is freed, and at most ``size`` are kept. Unshared Grams are never
    cached."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], tuple[list[weakref.ref[torch.Tensor]], Any]] \
            = OrderedDict()

    def get(self, pairs: Sequence[tuple[torch.Tensor, TensorFeature, float]],
            tag: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        grams = [f.gram for _, f, _ in pairs]
        if any(f.shared_gram is None or g is None
               for (_, f, _), g in zip(pairs, grams, strict=True)):
            return build()
        key = (tag, str(pairs[0][0].device), tuple(id(g) for g in grams),
               tuple(w for _, _, w in pairs))
        hit = self._entries.get(key)
        if hit is not None and all(r() is g for r, g in zip(hit[0], grams, strict=True)):
            self._entries.move_to_end(key)
            return hit[1]
        value = build()
        self._entries[key] = ([weakref.ref(g) for g in grams if g is not None], value)
        weakref.finalize(grams[0], self._entries.pop, key, None)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)


SOLVES = SharedSolves()


def lot_delta(tensors: Sequence[torch.Tensor], features: Sequence[TensorFeature | None], *,
              rtol: float = 1e-6, fallback: str = "mean", tasks: str = "rows",
              name: str = "tensor") -> torch.Tensor:
    """T*, the merged task vector of one tensor (before λ). ``tasks: equal`` divides each
    task's statistics by its row count first (every task weighs the same)."""
    kind = feature_kind(features, name)
    pairs = with_stats(tensors, features, per_row=tasks == "equal")
    if kind is None or not pairs:
        return mean_of(tensors) if fallback == "mean" else torch.zeros_like(tensors[0])
    like = tensors[0]
    if kind == "matmul":
        cross = None
        for t, f, w in pairs:
            cross = accumulate(cross, as_matrix(t, f) @ stat(f.gram, t, w),  # type: ignore[arg-type]
                               fresh=True)
        inverse = SOLVES.get(pairs, ("lot", rtol), lambda: _pinv_of_sum(pairs, rtol))
        return from_matrix(cross @ inverse, like, pairs[0][1])  # type: ignore[operator]
    if kind == "scale":
        energy = num = None
        for t, f, w in pairs:
            e = stat(f.energy, t, w)  # type: ignore[arg-type]
            energy = accumulate(energy, e)
            num = accumulate(num, e * t.to(torch.float64), fresh=True)
        seen = energy > 0  # type: ignore[operator]
        out = torch.where(seen, num / torch.where(seen, energy, 1.0),  # type: ignore[operator,arg-type]
                          mean_of(tensors).to(torch.float64))
        return out.to(like.dtype)
    rows = sum(f.rows * w for _, f, w in pairs)
    out = torch.zeros_like(like, dtype=torch.float64)
    for t, f, w in pairs:
        out.add_(t.to(torch.float64), alpha=f.rows * w / rows)
    return out.to(like.dtype)


def _pinv_of_sum(pairs: Sequence[tuple[torch.Tensor, TensorFeature, float]], rtol: float
                 ) -> torch.Tensor:
    """(Σ_k w_k G_k)^†, Hermitian, eigenvalues below rtol × the largest dropped."""
    gram = None
    for t, f, w in pairs:
        gram = accumulate(gram, stat(f.gram, t, w))  # type: ignore[arg-type]
    return torch.linalg.pinv(gram, rtol=rtol, hermitian=True)  # type: ignore[arg-type]


def lot_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
              features: Sequence[TensorFeature | None], lam: float = 1.0, rtol: float = 1e-6,
              fallback: str = "mean", tasks: str = "rows", name: str = "tensor") -> torch.Tensor:
    """θ0 + λ·T* for one tensor; ``tensors`` are the (sparsified) task vectors."""
    return base + lam * lot_delta(tensors, features, rtol=rtol, fallback=fallback, tasks=tasks,
                                  name=name)


METHODS.register(MergeMethod(
    name="lot",
    func=lot_merge,
    space="delta",
    params=(LAMBDA, RTOL, FALLBACK, TASKS),
    doc=__doc__ or "",
    model_params=(),
    features=True,
    calibration_options=GRAM_OPTIONS,
    calibration_why=GRAM_WHY,
))
