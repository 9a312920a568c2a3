"""Iso-CTS (isotropic merging in common and task-specific subspaces; Marczak et al., ICML 2025,
arXiv:2502.04959): the sum's top directions, plus each task's own directions outside them,
orthogonalised and given one common singular value.

Per 2-D tensor, with K task vectors tau_i = w_i * (theta_i - theta0) and r = min(m, n):

1. Sigma = sum_i tau_i = U diag(S) Vᵀ (thin SVD);
2. ranks, as the official code: c0 = floor(r * common_space_fraction); T = round((r - c0) / K) * K
   (Python's round: half to even; if that exceeds r, T - K: see below); common rank c = r - T;
   per-task rank n = T / K (so c + K n = r: no empty slot);
3. common part: U[:, :c], S[:c], V[:, :c];
4. for each task, its residual outside the common left subspace R_i = tau_i - U_c U_cᵀ tau_i,
   and R_i's top n singular triples;
5. stack the task blocks (in model order) then the common block: Ū (m x r), S̄ (r), V̄ᵀ (r x cols);
6. Ū⊥ = polar(Ū), V̄⊥ = polar(V̄) (P Qᵀ of the thin SVD, as TSV-Merge);
7. tau = s̄ Ū⊥ V̄⊥ᵀ with s̄ = mean(S̄) over all r entries (common and task-specific);
   theta = theta0 + lambda * tau.

``common_space_fraction`` = 1 (or any split that rounds to n = 0, e.g. r = 4, K = 2, f = 0.8)
gives Iso-C. All r singular values of the result equal s̄ (but for the degenerate cases (b)
below, where some are 0); it does not depend on the order of the models nor on the signs LAPACK
picks. Other tensors (1-D, conv kernels, ``decompose: false``) take the official running mean
of the task vectors (new += (tau_i - new) / i), times lambda.

| question            | mergewise                                                      |
|---------------------|----------------------------------------------------------------|
| space               | task vectors, base required                                    |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) on each tau_i first |
| weights             | ``weight`` scales tau_i before everything                      |
| common subspace     | top c of the sum; ``common_space_fraction`` 0.8 (paper, FusionBench) |
| task subspaces      | top n of each residual outside the common left subspace        |
| spectrum            | isotropic: the mean of the r slots' singular values            |
| null directions     | left out; dependent stacks orthogonalised over their rank (below) |
| global scale        | ``lambda`` = the paper's alpha; 1.0 as FusionBench (the paper tunes 0.1..3.0) |
| non-matrices        | running mean of the task vectors, times lambda                 |
| math dtype          | SVDs in float64 for float64, else float32 (half upcast)        |
| cost                | K + 3 thin SVDs per matrix                                     |

FusionBench's results table used lambda = 1.5 for ViT-B/32. Official code:
danielm1405/iso-merging ``src/utils/iso.py:iso_cts`` (FusionBench's ``iso_utils.py`` is the
same). Two differences: (a) where round((r - c0) / K) * K exceeds r (small
matrices with a small fraction, e.g. r = 3, K = 2, f = 0: T = 4) the official code gets a
negative common rank and fails (its task blocks do not fit); mergewise takes T - K instead.
(b) Numerically zero directions (singular values at or below max(m, n) * eps * the matrix's
scale: a rank-deficient sum or residual, e.g. LoRA task vectors or embedding rows no task
changed) are left out of the stacks and of the common projection, and a stack whose columns are
linearly dependent (the tasks' residual directions and the common ones can span fewer than r
dimensions: only the left side is projected) is orthogonalised over its numerical rank (the
partial isometry, as TSV-Merge here). The official code keeps LAPACK's arbitrary vectors and
completion there and gives them the weight s̄, so its result depends on the LAPACK build and
the dtype. s̄ stays the mean over all r slots, as the official code; the result then has fewer
than r singular values, all s̄. For full-rank inputs nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import weighted_sum
from ..registry import LAMBDA, METHODS, MergeMethod, Param
from .tsv import DECOMPOSE, drop_null, math_dtype, null_cutoff, polar, running_mean, scaled, thin_svd

COMMON_SPACE_FRACTION = Param("common_space_fraction", 0.8, float, "share of min(rows, cols) "
                              "given to the common subspace of the summed task vectors (before "
                              "rounding the rest to a multiple of K)", low=0.0, high=1.0)


def split_ranks(r: int, k: int, fraction: float) -> tuple[int, int]:
    """(common rank c, per-task rank n) with c + k * n = r, the official rounding."""
    c0 = int(r * fraction)
    total = round((r - c0) / k) * k
    if total > r:
        total -= k
    return r - total, total // k


def iso_cts_core(taus: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """tau_Iso-CTS of K matrices (already in the math dtype)."""
    shape = taus[0].shape
    r = min(shape)
    common, per_task = split_ranks(r, len(taus), fraction)
    u, s, vh = thin_svd(weighted_sum(taus))
    # the common block, its numerically zero directions (LAPACK's choice) left out, also from
    # the projection
    u_c, s_c, vh_c = drop_null(u[:, :common], s[:common], vh[:common],
                               null_cutoff(s[0], shape, s.dtype))
    blocks = []
    s_sum = s[:common].sum()  # s̄ = mean of all r slots, the null ones included (as official)
    if per_task:
        for tau in taus:
            ui, si, vhi = thin_svd(tau - u_c @ (u_c.T @ tau))
            s_sum = s_sum + si[:per_task].sum()
            blocks.append(drop_null(ui[:, :per_task], si[:per_task], vhi[:per_task],
                                    null_cutoff(torch.linalg.norm(tau), shape, s.dtype)))
    blocks.append((u_c, s_c, vh_c))
    u_bar = torch.cat([b[0] for b in blocks], dim=1)
    vh_bar = torch.cat([b[2] for b in blocks], dim=0)
    if u_bar.shape[1] == 0:
        return torch.zeros_like(taus[0])
    return (s_sum / r) * (polar(u_bar) @ polar(vh_bar))


def iso_cts_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  *, lam: float = 1.0, common_space_fraction: float = 0.8,
                  decompose: bool = True) -> torch.Tensor:
    taus = scaled(tensors, weights)
    if base.dim() != 2 or not decompose:
        return base + lam * running_mean(taus)
    dtype = math_dtype(base.dtype)
    merged = iso_cts_core([t.to(dtype) for t in taus], common_space_fraction)
    return base + lam * merged.to(base.dtype)


METHODS.register(MergeMethod(
    name="iso_cts",
    func=iso_cts_merge,
    space="delta",
    params=(LAMBDA, COMMON_SPACE_FRACTION, DECOMPOSE),
    doc=__doc__ or "",
    accepts_sparsify=True,
))
