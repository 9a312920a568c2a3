"""WUDI-Merging (Cheng et al., ICML 2025): data-free, the task vectors are their own inputs.

For a linear weight with task vectors tau_k (torch layout (out, in)), the rows of tau_k stand
in for task k's inputs, and the merged task vector tau_m minimises the interference

    L(tau_m) = sum_k ||(tau_m - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2

then theta = theta0 + lambda * tau_m. Two solvers:

- ``solver: adam`` (default; the official code, ``vit/wudi_main.py:get_redundant_task_vector``,
  and FusionBench's ``wudi_merging``, which give the paper's numbers): tau_m starts at the
  **sum** sum_k tau_k and takes ``iterations`` full-batch Adam steps (``lr`` 1e-5, betas
  (0.9, 0.999), eps 1e-8, no weight decay; torch's Adam update, written out) on L, in
  ``dtype``. The gradient is 2 sum_k (tau_m - tau_k) tau_k^T tau_k / ||tau_k||^2, each term from
  its own residual (an exact 0 for a task tau_m already equals). This is **not** the minimiser:
  Adam moves each entry by about ``lr`` per step whatever the gradient's size, so 300 steps at
  1e-5 move an entry by at most ~3e-3 from the sum.
- ``solver: closed_form`` (a different method, not in the paper): the minimiser
  tau* = (sum_k tau_k G_k)(sum_k G_k)^+ with G_k = tau_k^T tau_k / ||tau_k||^2 (the RegMean/LOT
  form with the task vectors' own Grams), in float64; ^+ is the Hermitian pseudo-inverse
  (eigenvalues below ``rtol`` x the largest count as null: the minimum-norm minimiser). A task
  vector that is all zero takes no part (its term is 0/0).

Which tensors are solved (``matrices``): ``linear`` (default) = 2-D weights whose name is an
attention or MLP projection (q/k/v/qkv/o, gate/up/down, fc1/fc2, c_fc/c_proj, in_proj/out_proj;
``mergewise.report.module_kind``), as the official ViT code solves only ``attn.in_proj_weight``,
``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``; ``all_2d`` = every 2-D
tensor (FusionBench: embeddings and heads too). A fused QKV weight is one matrix. transformers
GPT-2 ``Conv1D`` weights are stored (in, out): give ``layout: in_out`` for them (a filter
list), so the inputs are their columns. Every other tensor (norms, biases, embeddings, heads)
follows ``others``: ``base`` (default: the official code leaves them at theta0), ``mean`` of
the task vectors (FusionBench) or ``sum`` (task arithmetic); lambda applies to them too.

| question            | mergewise                                                        |
|---------------------|------------------------------------------------------------------|
| objective           | sum_k \\|(tau_m - tau_k) tau_k^T\\|^2 / \\|tau_k\\|_F^2 (official)  |
| proxy inputs        | rows of tau_k (out, in); ``layout: in_out`` for (in, out) storage  |
| solver              | ``adam``: 300 steps, lr 1e-5, init sum (official); ``closed_form`` |
| solved tensors      | ``matrices``: linear (official) or all_2d (FusionBench)           |
| other tensors       | ``others``: base (official), mean (FusionBench) or sum            |
| global scale        | ``lambda`` 1.0 (official ``scaling_coef=1``; FusionBench has none) |
| per-model weight    | none (the paper has none)                                        |
| sparsify            | optional ``sparsify:`` block (e.g. TADrop) before the solve      |
| RNG                 | none: deterministic                                              |
| math dtype          | adam in ``dtype`` (float32 default); closed_form in float64      |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..numerics import weighted_sum
from ..registry import LAMBDA, METHODS, MergeMethod, Param
from ..report import module_kind

SOLVER = Param("solver", "adam", str, "adam: the official few Adam steps from the sum; "
               "closed_form: the exact minimiser (a different method)",
               choices=("adam", "closed_form"))
ITERATIONS = Param("iterations", 300, int, "Adam steps (official 300; FusionBench's yaml 400)",
                   low=0, high=1_000_000)
LR = Param("lr", 1e-5, float, "Adam learning rate (official ViT 1e-5, RoBERTa 2e-5)",
           low=0.0, low_open=True, high=1.0)
RTOL = Param("rtol", 1e-6, float, "closed_form: eigenvalues of the summed Gram below rtol x "
             "the largest count as null", low=0.0, high=1.0, high_open=True)
MATRICES = Param("matrices", "linear", str, "which 2-D tensors are solved: attention/MLP "
                 "projection weights by name (official), or every 2-D tensor (FusionBench)",
                 choices=("linear", "all_2d"))
OTHERS = Param("others", "base", str, "tensors not solved: keep the base (official), mean or "
               "sum of the task vectors", choices=("base", "mean", "sum"))
LAYOUT = Param("layout", "out_in", str, "how a solved weight is stored: (out, in) as nn.Linear, "
               "or (in, out) as transformers Conv1D", choices=("out_in", "in_out"))

BETAS = (0.9, 0.999)
EPS = 1e-8
LINEAR_KINDS = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_gate",
                          "mlp_up", "mlp_down"})


def is_solved(t: torch.Tensor, name: str, matrices: str) -> bool:
    """Whether tensor ``name`` is a matrix WUDI solves (else it follows ``others``)."""
    if t.dim() != 2:
        return False
    return matrices == "all_2d" or module_kind(name) in LINEAR_KINDS


def interference(merged: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L(tau_m) of (out, in) matrices, in their dtype (for tests and diagnostics)."""
    total = merged.new_zeros(())
    for t in tensors:
        norm = t.square().sum()
        if norm > 0:
            total = total + ((merged - t) @ t.T).square().sum() / norm
    return total


def adam_solve(tensors: Sequence[torch.Tensor], *, iterations: int = 300, lr: float = 1e-5
               ) -> torch.Tensor:
    """The official WUDI: Adam on L from the sum of the (out, in) task vectors, in their dtype.

    torch's single-tensor Adam (no weight decay, no amsgrad): m = b1 m + (1 - b1) g,
    v = b2 v + (1 - b2) g^2, p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    Each term's product is taken on the smaller side (Gram tau_k^T tau_k precomputed when
    in <= out, else (residual tau_k^T) tau_k), so a step costs ~K out in min(out, in).
    """
    merged = weighted_sum(tensors)
    terms = []
    for t in tensors:
        norm = float(t.square().sum(dtype=torch.float64))
        if norm > 0:
            gram = t.T @ t if t.shape[1] <= t.shape[0] else None
            terms.append((t, gram, 2.0 / norm))
    if not terms or iterations == 0:
        return merged
    b1, b2 = BETAS
    m = torch.zeros_like(merged)
    v = torch.zeros_like(merged)
    grad = torch.empty_like(merged)
    for step in range(1, iterations + 1):
        grad.zero_()
        for t, gram, scale in terms:
            residual = merged - t
            part = residual @ gram if gram is not None else (residual @ t.T) @ t
            grad.add_(part, alpha=scale)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = lr / (1 - b1 ** step)
        denom = (v.sqrt() / (1 - b2 ** step) ** 0.5).add_(EPS)
        merged.addcdiv_(m, denom, value=-step_size)
    return merged


def closed_form_solve(tensors: Sequence[torch.Tensor], *, rtol: float = 1e-6) -> torch.Tensor:
    """The minimiser of L, (sum_k tau_k G_k)(sum_k G_k)^+, in float64 (same dtype out)."""
    gram = cross = None
    for t in tensors:
        t64 = t.to(torch.float64)
        norm = t64.square().sum()
        if norm == 0:
            continue
        g = (t64.T @ t64) / norm
        gram = g if gram is None else gram.add_(g)
        c = t64 @ g
        cross = c if cross is None else cross.add_(c)
    if gram is None or cross is None:
        return torch.zeros_like(tensors[0])
    return (cross @ torch.linalg.pinv(gram, rtol=rtol, hermitian=True)).to(tensors[0].dtype)


def wudi_delta(tensors: Sequence[torch.Tensor], *, name: str = "tensor", solver: str = "adam",
               iterations: int = 300, lr: float = 1e-5, rtol: float = 1e-6,
               matrices: str = "linear", others: str = "base", layout: str = "out_in"
               ) -> torch.Tensor | None:
    """WUDI's merged task vector of one tensor (before lambda); None for ``others: base``."""
    if not is_solved(tensors[0], name, matrices):
        if others == "base":
            return None
        total = weighted_sum(tensors)
        return total.div_(len(tensors)) if others == "mean" else total
    mats = [t.T for t in tensors] if layout == "in_out" else list(tensors)
    if solver == "adam":
        out = adam_solve(mats, iterations=iterations, lr=lr)
    else:
        out = closed_form_solve(mats, rtol=rtol)
    return out.T.contiguous() if layout == "in_out" else out


def wudi_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
               name: str = "tensor", lam: float = 1.0, solver: str = "adam",
               iterations: int = 300, lr: float = 1e-5, rtol: float = 1e-6,
               matrices: str = "linear", others: str = "base", layout: str = "out_in"
               ) -> torch.Tensor:
    """theta0 + lambda * tau_m for one tensor; ``tensors`` are the (sparsified) task vectors.
    ``name`` (the engine passes the tensor's) decides with ``matrices`` whether it is solved."""
    delta = wudi_delta(tensors, name=name, solver=solver, iterations=iterations, lr=lr,
                       rtol=rtol, matrices=matrices, others=others, layout=layout)
    if delta is None:
        return base.clone()
    return base + lam * delta


METHODS.register(MergeMethod(
    name="wudi",
    func=wudi_merge,
    space="delta",
    params=(LAMBDA, SOLVER, ITERATIONS, LR, RTOL, MATRICES, OTHERS, LAYOUT),
    doc=__doc__ or "",
    model_params=(),
    takes_name=True,
))
