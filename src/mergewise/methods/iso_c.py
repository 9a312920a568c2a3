"""Iso-C (isotropic merging in the common subspace; Marczak et al., ICML 2025,
arXiv:2502.04959): sum the task vectors of every weight matrix and flatten its spectrum.

Per 2-D tensor, with K task vectors tau_i = w_i * (theta_i - theta0) and r = min(m, n):
Sigma = sum_i tau_i = U diag(S) Vᵀ (thin SVD); every singular value is replaced by their mean
s̄ = mean(S) (all r of them), so tau_iso = s̄ U Vᵀ = s̄ polar(Sigma), and
theta = theta0 + lambda * tau_iso. All r singular values of tau_iso equal s̄ (for a full-rank
sum: see below), whatever the signs LAPACK picks (U D (D Vᵀ) = U Vᵀ).

Other tensors (1-D norms and biases, conv kernels, any tensor with ``decompose: false``) take the
mean sum_i tau_i / K, times lambda, as the official code does; embeddings and position tables
are 2-D and are decomposed like any matrix (the official code excludes only open_clip's
``text_projection``: set ``decompose`` per tensor with a filter to do the same).

A rank-deficient Sigma (LoRA task vectors, embedding rows no task changed, task vectors that
cancel in a direction) has null-space singular vectors that LAPACK picks arbitrarily; the
official code gives them the weight s̄ too, so its result depends on the LAPACK build and the
dtype. mergewise leaves the numerically zero directions (singular values at or below
max(m, n) * eps * S[0]) out of U Vᵀ, keeping s̄ = mean of all r singular values as the official
code: the same result for full-rank sums (full fine-tuning), a defined one otherwise, whose
non-zero singular values all equal s̄.

| question            | mergewise                                                      |
|---------------------|----------------------------------------------------------------|
| space               | task vectors, base required                                    |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) on each tau_i before the sum |
| weights             | ``weight`` scales tau_i before the sum                         |
| spectrum            | every singular value of the sum set to their mean s̄            |
| null directions     | singular values <= max(m, n) eps S[0] stay 0 (see above)       |
| global scale        | ``lambda`` = the paper's alpha; 1.0 as FusionBench (the paper tunes 0.1..3.0) |
| non-matrices        | mean of the task vectors, times lambda                         |
| math dtype          | SVD in float64 for float64, else float32 (half upcast; FusionBench does not) |
| cost                | one thin SVD per matrix                                        |

FusionBench's results table used lambda = 1.5 for ViT-B/32. Official code:
danielm1405/iso-merging ``src/utils/iso.py:iso_c`` (FusionBench's
``isotropic_merging/iso_utils.py`` is the same). It forms the mean and multiplies it by K
again; mergewise sums directly (equal up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import weighted_sum
from ..registry import LAMBDA, METHODS, MergeMethod
from .tsv import DECOMPOSE, drop_null, math_dtype, null_cutoff, scaled, thin_svd


def iso_c_core(total: torch.Tensor) -> torch.Tensor:
    """s̄ U Vᵀ of one matrix (in the math dtype), its null directions left out."""
    u, s, vh = thin_svd(total)
    s_bar = s.mean()
    u, _, vh = drop_null(u, s, vh, null_cutoff(s[0], total.shape, s.dtype))
    return s_bar * (u @ vh)


def iso_c_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                lam: float = 1.0, decompose: bool = True) -> torch.Tensor:
    total = weighted_sum(scaled(tensors, weights))
    if base.dim() != 2 or not decompose:
        return base + lam * total.div_(len(tensors))
    merged = iso_c_core(total.to(math_dtype(base.dtype)))
    return base + lam * merged.to(base.dtype)


METHODS.register(MergeMethod(
    name="iso_c",
    func=iso_c_merge,
    space="delta",
    params=(LAMBDA, DECOMPOSE),
    doc=__doc__ or "",
    accepts_sparsify=True,
))
