"""TSV-Merge (Task Singular Vectors; Gargiulo et al., CVPR 2025, arXiv:2412.00081): keep each
task's top singular triples of every weight matrix, decorrelate the tasks by orthogonalising the
stacked singular vectors, and add the result to the base.

Per 2-D tensor, with K task vectors tau_i = w_i * (theta_i - theta0) of shape m x n, r = min(m, n):

1. per task, the thin SVD tau_i = U_i diag(S_i) V_iᵀ; keep its top k = floor(r * rank_fraction)
   triples (default rank_fraction = 1/K, computed as the official ``int(r * (1 / K))``);
2. stack them task by task: U = [U_1[:, :k] .. U_K[:, :k]] (m x Kk), S = [S_1[:k] .. S_K[:k]],
   V = [V_1[:, :k] .. V_K[:, :k]] (n x Kk);
3. orthogonalise both stacks by their polar factor (the paper's whitening): U⊥ = P Qᵀ where
   U = P Σ Qᵀ is the thin SVD (the orthonormal matrix nearest to U), likewise V⊥ (the
   singular values of a stack are taken down to its numerical rank: see below);
4. tau_TSV = U⊥ diag(S) V⊥ᵀ (the tasks' own singular values, not rescaled, not re-sorted);
   theta = theta0 + lambda * tau_TSV.

Other tensors (1-D norms and biases, conv kernels, any tensor with ``decompose: false``) take the
mean of the task vectors (the official running mean, new += (tau_i - new) / i), also scaled by
lambda, as the official code does. ``decompose`` set per tensor with a filter excludes a matrix
from the SVD, as the official code excludes open_clip's ``text_projection``; embeddings and
position tables are 2-D and are decomposed like any matrix, as there.

K = 1 with rank_fraction 1 returns theta0 + lambda * tau exactly (up to rounding); task vectors
with mutually orthogonal row and column spaces, each of rank <= k, give task arithmetic. With
K > r (a 2 x n matrix, 3 tasks) k = 0 and the matrix keeps the base, as in the official code.
The result does not depend on the signs LAPACK picks for singular vectors (polar(U D) =
polar(U) D for a diagonal sign matrix D) nor on the order of the models.

| question            | mergewise                                                      |
|---------------------|----------------------------------------------------------------|
| space               | task vectors, base required                                    |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) on each tau_i before its SVD |
| weights             | ``weight`` scales tau_i before its SVD (FusionBench's alpha list) |
| rank per task       | ``rank_fraction`` x r, floored; default 1/K (the paper's rule) |
| rank_fraction > 1/K | more than r stacked columns; 1 = the official "lossless" variant |
| orthogonalisation   | polar factor of each stack by thin SVD (``full_matrices=False``) |
| global scale        | ``lambda`` = the paper's alpha; 1.0 as FusionBench (the paper tunes 0.1..3.0) |
| non-matrices        | running mean of the task vectors, times lambda                 |
| null directions     | triples with S <= max(m, n) eps S_i[0] dropped (see below)     |
| dependent stacks    | polar factor over the stack's numerical rank (see below)       |
| math dtype          | SVDs in float64 for float64, else float32 (half upcast, as FusionBench) |
| cost                | K + 2 thin SVDs per matrix                                     |

Where mergewise differs from the official code (AntoAndGar/task_singular_vectors,
``compute_and_sum_svd_mem_reduction``; FusionBench's port is the same) it is where the official
result is not defined by the inputs but by LAPACK's arbitrary choices; for full-rank task
vectors with linearly independent stacked directions (generic full fine-tuning) both agree.
(a) A task vector of rank below k (a zero task vector, a LoRA update, embedding rows no task
changed) has singular vectors that LAPACK picks arbitrarily for its zero singular values; the
official code stacks them anyway and, through the orthogonalisation, they bend the other tasks'
directions (task 1 = diag(3, 1), task 2 = 0 gives [[1.5, -1.5], [-1.5, 1.5]] with the official
code on CPU LAPACK, diag(3, 0) here): mergewise leaves them out. (b) A stack whose columns are
linearly dependent (two tasks sharing a direction, exactly) has no unique polar factor; mergewise
takes it over the stack's numerical rank (the partial isometry), so two identical task vectors
give their own rank-k truncation. (c) The official code preallocates r columns and leaves the
K*k..r-1 tail zero; mergewise stacks only the Kk kept columns: the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import rounded_weight
from ..registry import LAMBDA, METHODS, MergeMethod, Param

RANK_FRACTION = Param("rank_fraction", None, float, "singular triples kept per task, as a "
                      "fraction of min(rows, cols), floored (none: 1/K, the paper's rule)",
                      low=0.0, high=1.0, low_open=True)
DECOMPOSE = Param("decompose", True, bool, "2-D tensors: merge by SVD (true) or take the mean of "
                  "the task vectors like 1-D tensors (false; set per tensor with a filter to "
                  "exclude a matrix, as the official code excludes text_projection)")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the decompositions: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(m, full_matrices=False)


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of a = P Σ Qᵀ (thin SVD) over a's numerical rank: for a
    full-rank ``a`` the orthonormal matrix nearest to it; for a rank-deficient one the partial
    isometry P_ρ Q_ρᵀ (the unique part: the rest would be LAPACK's arbitrary completion)."""
    p, s, qh = thin_svd(a)
    if s.numel() == 0:
        return torch.zeros_like(a)
    keep = s > null_cutoff(s[0], a.shape, s.dtype)
    return p[:, keep] @ qh[keep]


def null_cutoff(scale: torch.Tensor | float, shape: Sequence[int], dtype: torch.dtype) -> float:
    """Singular values at or below this are numerically zero: max(shape) * eps * scale (the
    rank rule of numpy's matrix_rank; ``scale`` is the matrix's largest singular value or norm)."""
    return max(shape) * torch.finfo(dtype).eps * float(scale)


def drop_null(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, cutoff: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triples with s > cutoff; the others (LAPACK's arbitrary vectors) left out."""
    keep = s > cutoff
    return u[:, keep], s[keep], vh[keep]


def scaled(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    """w_k * tau_k (the weight rounded to the tensors' dtype, as ``weighted_sum``)."""
    out = []
    for t, w in zip(tensors, weights, strict=True):
        w = rounded_weight(w, t.dtype)
        out.append(t if w == 1.0 else t * w)
    return out


def running_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The official codes' mean of non-matrices: new = t_1; new += (t_i - new) / i."""
    out = tensors[0].clone()
    for i, t in enumerate(tensors[1:], start=2):
        out += (t - out) / i
    return out


def top_triples(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triples of ``tau`` (U[:, :k], S[:k], Vh[:k]) whose singular values
    are not numerically zero (past the numerical rank the vectors are LAPACK's arbitrary choice)."""
    u, s, vh = thin_svd(tau)
    if s.numel() == 0:
        return u[:, :0], s[:0], vh[:0]
    return drop_null(u[:, :k], s[:k], vh[:k], null_cutoff(s[0], tau.shape, s.dtype))


def tsv_core(taus: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """tau_TSV of K matrices (already in the math dtype) with k triples per task; the stacks hold
    only the kept triples (empty slots would meet S = 0: the same product)."""
    u, s, vh = (torch.cat(parts, dim=d) for parts, d in
                zip(zip(*(top_triples(t, k) for t in taus), strict=True), (1, 0, 0), strict=True))
    if s.numel() == 0:
        return torch.zeros_like(taus[0])
    return (polar(u) * s) @ polar(vh)


def tsv_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
              lam: float = 1.0, rank_fraction: float | None = None,
              decompose: bool = True) -> torch.Tensor:
    taus = scaled(tensors, weights)
    if base.dim() != 2 or not decompose:
        return base + lam * running_mean(taus)
    r = min(base.shape)
    fraction = 1 / len(taus) if rank_fraction is None else rank_fraction
    k = int(r * fraction)
    if k == 0:
        return base.clone()
    dtype = math_dtype(base.dtype)
    merged = tsv_core([t.to(dtype) for t in taus], k)
    return base + lam * merged.to(base.dtype)


METHODS.register(MergeMethod(
    name="tsv",
    func=tsv_merge,
    space="delta",
    params=(LAMBDA, RANK_FRACTION, DECOMPOSE),
    doc=__doc__ or "",
    accepts_sparsify=True,
))
