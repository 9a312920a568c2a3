"""Arcee Fusion: keep only the model's most important changes to the base (mergekit's
``arcee_fusion``, Arcee AI; no paper).

With a = base and b = the one model, per entry:

1. importance = |b - a| * KL(p || q), p = softmax(b) + 1e-8, q = softmax(a) + 1e-8 along the
   last dimension, the KL summed per row (the whole vector for 1-D tensors), so an entry
   matters when it moved far in a row whose distribution moved;
2. threshold = median + 1.5 (q3 - q1) of the importances, each quartile the sorted value at
   index floor(q (n - 1)) (no interpolation; mergekit's rule);
3. theta = a + (b - a) * [importance >= threshold].

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights; base + exactly one model                     |
| parameters          | none                                                       |
| quartiles           | exact order statistics at floor(q (n - 1)) of all entries, any size |
| RNG                 | none                                                       |
| math dtype          | ``dtype`` (float32 default; importance in float32 for float16); result in ``dtype`` |
| mergekit            | over 1M entries: quartiles of 1M entries drawn with replacement from torch's global |
|                     | RNG (other values on every unseeded run; shifts later random merges' stream); here |
|                     | exact and deterministic (the same values up to 1M entries)                  |
| mergekit            | its mask is float32, so bfloat16/float16 inputs give float32 tensors; here the     |
|                     | result is in the compute dtype                                              |
| mergekit            | float16: the 1e-8 underflows to 0, so a softmax entry that underflows gives       |
|                     | 0 log 0 = NaN and its whole row stays the base; here float16 importances are   |
|                     | computed in float32                                                         |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod
from ..selection import kth_largest

EPS = 1e-8


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|b - a| times the per-row KL divergence of softmax(b) from softmax(a), both + 1e-8; in
    float32 for float16 inputs, where 1e-8 is 0 and an underflowing softmax entry gives NaN."""
    if model.dtype == torch.float16:
        return importance(model.float(), base.float())
    diff = (model - base).abs()
    p = torch.softmax(model, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def quartiles(x: torch.Tensor) -> list[torch.Tensor]:
    """q1, median, q3 of all entries: the sorted values at index floor(k (n - 1) / 4), k = 1, 2,
    3 (exactly mergekit's float32 index for n <= 1M), found by selection, not a full sort."""
    flat = x.reshape(-1)
    n = flat.numel()
    # the (i+1)-th smallest is the (n-i)-th largest
    return [kth_largest(flat, n - k * (n - 1) // 4) for k in (1, 2, 3)]


def arcee_fusion(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> torch.Tensor:
    (model,) = tensors
    if model.numel() == 0:
        return base.clone()
    scores = importance(model, base)
    q1, median, q3 = quartiles(scores)
    threshold = median + 1.5 * (q3 - q1)
    mask = (scores >= threshold).to(base.dtype)
    return base + (model - base) * mask


METHODS.register(MergeMethod(
    name="arcee_fusion",
    func=arcee_fusion,
    space="weight",
    params=(),
    doc=__doc__ or "",
    requires_base=True,
    uses_base=True,
    min_models=1,
    max_models=1,
    model_params=(),
    accepts_sparsify=False,
))
