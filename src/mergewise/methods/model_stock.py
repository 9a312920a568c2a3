"""Model Stock (Jang et al. 2024, arXiv:2403.19522): move from the base towards the models'
average by a ratio set by the angle between their task vectors.

With w0 = base, w_1..w_N the models (N >= 2) and tau_i = w_i - w0: cos = the mean over all pairs
i < j of tau_i.tau_j / max(|tau_i| |tau_j|, 1e-6), clamped to [-1, 1], and

    t = N cos / (1 + (N - 1) cos);   theta = t * mean_i(w_i) + (1 - t) * w0

Nearly parallel task vectors (cos -> 1) give t -> 1 (the average); orthogonal ones t = 0 (the
base). Where 1 + (N - 1) cos is below 1e-6 in magnitude there is no finite estimate and the
base is kept (t = 0). ``filter_wise: true`` computes cos and t per row (last dimension; a 1-D
tensor is one row) instead of over the flattened tensor.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| space               | full weights; base + at least two models                   |
| angle               | mean pairwise cosine of the task vectors, per tensor or per row (``filter_wise``) |
| singular t          | abs(1 + (N - 1) cos) < 1e-6: t = 0, the base               |
| zero task vector    | its cosines are 0 (norm product clamped to 1e-6)           |
| weights             | none (every model counts equally, as in the paper)         |
| math dtype          | ``dtype`` (float32 default), mergekit's operation order    |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import METHODS, MergeMethod, Param

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                *, filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base
        ws = [w.reshape(w0.shape) for w in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / denominator)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


METHODS.register(MergeMethod(
    name="model_stock",
    func=model_stock,
    space="weight",
    params=(Param("filter_wise", False, bool, "one angle and ratio per row (last dimension) "
                  "instead of per tensor"),),
    doc=__doc__ or "",
    requires_base=True,
    uses_base=True,
    min_models=2,
    model_params=(),
    accepts_sparsify=False,
))
