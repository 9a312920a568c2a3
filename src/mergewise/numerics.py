"""Small numeric kernels shared by the engine, the methods and the modulators: cheap finite
checks, float64 norms through a reused buffer, the weighted sum of task vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import NonFiniteError, RecipeError
from .tensors import dtype_name


def all_finite(t: torch.Tensor) -> bool:
    """Exactly ``bool(torch.isfinite(t).all())``, in one cheap reduction when the answer is yes.

    A NaN or Inf entry makes the sum NaN or Inf, so a finite sum proves every entry finite; only
    a non-finite sum (a bad entry, or finite values whose sum overflows) takes the exact check.
    ``isfinite`` builds several full-size temporaries and costs ~30x a ``sum`` on large tensors.
    """
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, label: str, name: str) -> None:
    """Raise a one-line NonFiniteError naming the input and tensor when ``t`` has NaN/Inf."""
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{label}: tensor '{name}' has {bad} NaN/Inf value(s); fix or "
                             "re-export this checkpoint before merging")


class Float64Norm:
    """``float(vector_norm(t, dtype=float64))`` through one reused float64 buffer.

    ``dtype=float64`` makes a fresh float64 copy of the tensor on every call (page faults
    included); copying into a buffer kept for all the tensors of one shape gives the same
    float64 values in the same contiguous layout, reduced by the same kernel: the same value,
    4x faster on large tensors.
    """

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor) -> float:
        if t.dtype == torch.float64 or not t.is_contiguous():
            return float(torch.linalg.vector_norm(t, dtype=torch.float64))
        if self.buf is None or self.buf.shape != t.shape or self.buf.device != t.device:
            self.buf = torch.empty(t.shape, dtype=torch.float64, device=t.device)
        return float(torch.linalg.vector_norm(self.buf.copy_(t)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of half-precision tensors accumulate in float32 and round once (as torch's own
    reductions, and mergekit's, do); float32 and float64 sums stay in their dtype."""
    return torch.promote_types(dtype, torch.float32)


REPORT_CHUNK = 1 << 18


class ReportNorm:
    """``report_norm``'s running sum, fed in pieces: pieces that start at multiples of
    ``REPORT_CHUNK`` add the same partial sums in the same order, so the norm is the same bits
    whether the tensor arrives whole or chunk by chunk (``chunked``)."""

    def __init__(self) -> None:
        self.total = 0.0

    def add(self, flat: torch.Tensor, minus: torch.Tensor | None = None) -> None:
        self.extend(self.partials(flat, minus))

    @staticmethod
    def partials(flat: torch.Tensor, minus: torch.Tensor | None = None) -> list[float]:
        """The partial sums ``add`` would add (computed anywhere, added in order by ``extend``:
        chunks merged on several threads give the serial bits)."""
        out = []
        for i in range(0, flat.numel(), REPORT_CHUNK):
            part = flat[i:i + REPORT_CHUNK].float()
            if minus is not None:
                part = part - minus[i:i + REPORT_CHUNK]
            out.append(float((part * part).sum()))
        return out

    def extend(self, partials: list[float]) -> None:
        for p in partials:
            self.total += p

    @property
    def value(self) -> float:
        return math.sqrt(self.total)


class L1Sum:
    """sum |t|, fed whole or in pieces: each ``REPORT_CHUNK`` piece summed in float64 and the
    pieces in order, so a tensor that arrives chunk by chunk (``chunked``) gets the same bits as
    one that arrives whole, and a CUDA tensor the CPU's (float64 partials round alike)."""

    def __init__(self) -> None:
        self.total = 0.0

    def add(self, flat: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add sum |flat| (times the 0/1 ``keep`` mask, if given) to the running total."""
        for i in range(0, flat.numel(), REPORT_CHUNK):
            part = flat[i:i + REPORT_CHUNK].abs()
            if keep is not None:
                part = part * keep[i:i + REPORT_CHUNK]
            self.total += float(part.sum(dtype=torch.float64))


def l1_sum(t: torch.Tensor) -> float:
    """``L1Sum`` of a whole tensor (any shape)."""
    total = L1Sum()
    total.add(t.reshape(-1))
    return total.total


def report_norm(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """The L2 norm of ``t`` (or of ``t - minus``) for reports: squares summed in float32 chunks
    of 2^18 entries (torch's cascade sum: relative error ~1e-9 here) and the chunks in float64.
    One read of the tensor and no full-size temporary, where ``vector_norm(dtype=float64)``
    writes a float64 copy (~7x slower); float64 tensors take the exact float64 norm."""
    flat = t.reshape(-1)
    other = minus.reshape(-1) if minus is not None else None
    if flat.dtype == torch.float64:
        return float(torch.linalg.vector_norm(flat if other is None else flat - other))
    norm = ReportNorm()
    norm.add(flat, other)
    return norm.value


def stored_or_raise(out: torch.Tensor, out_dtype: torch.dtype, method: str, name: str
                    ) -> torch.Tensor:
    """``out`` cast to the dtype it is written in, checked finite once (on what is written);
    the message says whether the method made NaN/Inf or the cast overflowed."""
    stored = out.to(dtype=out_dtype)
    if not all_finite(stored):
        if not all_finite(out):
            raise NonFiniteError(f"{method} produced NaN/Inf for tensor '{name}'; "
                                 "check the recipe's weights and lambda")
        raise NonFiniteError(f"{method}: tensor '{name}' overflows out_dtype "
                             f"{dtype_name(out_dtype)} (values beyond its "
                             "range); use a wider out_dtype or check the recipe's weights and "
                             "lambda")
    return stored


def rounded_weight(w: float, dtype: torch.dtype) -> float:
    """A model weight as mergekit uses it: rounded to the compute dtype first."""
    return float(torch.tensor(w, dtype=dtype))


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None
                 ) -> torch.Tensor:
    """sum_k w_k t_k (every w_k = 1 when ``weights`` is None) in model order, as mergekit's
    task-arithmetic family computes it: each product w_k t_k rounded in the tensors' dtype
    (the weight first rounded to that dtype), the sum accumulated in float32 for half
    precision and rounded once; returned in ``tensors[0]``'s dtype."""
    dtype = tensors[0].dtype
    acc = accumulation_dtype(dtype)
    out = torch.zeros(tensors[0].shape, dtype=acc, device=tensors[0].device)
    for k, t in enumerate(tensors):
        w = 1.0 if weights is None else rounded_weight(weights[k], dtype)
        out.add_(t if w == 1.0 else t * w)
    return out if acc == dtype else out.to(dtype)


def divide_by_weight_sum(t: torch.Tensor, weights: Sequence[float], method: str) -> torch.Tensor:
    """``t / sum(weights)`` in place (``normalize: true``), the weights rounded to ``t``'s dtype
    and summed there, as mergekit; a sum below 1e-8 (where mergekit silently skips the division)
    is a recipe error."""
    total = torch.tensor(list(weights), dtype=t.dtype).sum()
    if abs(float(total)) < 1e-8:
        raise RecipeError(f"{method}: the model weights sum to 0; set normalize: false")
    return t.div_(total.to(t.device))
