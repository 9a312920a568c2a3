"""``Float64Norm`` of a tensor that is never whole, the same bits (TADrop's ||kept|| on the
chunked path).

``Float64Norm`` copies a tensor into float64 and reduces it with torch's vectorised L2 kernel,
which keeps one accumulator per SIMD lane (lane j sums the squares of entries j, j + W, j + 2W,
... in order), adds the lanes, then the squares of the last n mod W entries, and takes the root.
An aligned group of G entries that are all zero adds exactly 0.0 to every lane when G is a
multiple of W, so dropping such groups changes no partial sum: the norm of the remaining groups,
concatenated, followed by the tensor's last n mod G entries is the whole tensor's, bit for bit.
Only the nonzero groups are kept (a sparse kept set keeps few), and that float64 copy is reduced
once at the end. G is checked once against ``Float64Norm`` on sparse random tensors; on a kernel
where no G passes, every group is kept (the concatenation is then the tensor itself: exact on any
kernel).
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import torch

from .numerics import Float64Norm

GROUPS = (4, 8)  # the float64 lanes of AVX2 (and of torch's scalar fallback), of AVX-512

_BITS = {1: (torch.int8, np.uint8), 2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32),
         8: (torch.int64, np.uint64)}


def _as_bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a flat CPU tensor as unsigned integers of its item size."""
    signed, unsigned = _BITS[t.element_size()]
    return t.view(signed).numpy().view(unsigned)


def _from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits).view(_BITS[bits.itemsize][0]).view(dtype)


class _Pool(threading.local):
    """One float64 buffer per thread, grown to the largest tensor normed: a fresh one per call
    costs its page faults, several times the norm itself."""

    buf: torch.Tensor | None = None


_POOL = _Pool()


def float64_norm(t: torch.Tensor) -> float:
    """``Float64Norm()(t)``, the same bits (the same float64 values, contiguous, the same
    kernel), through this thread's reused buffer for contiguous CPU tensors."""
    if t.device.type != "cpu" or t.dtype == torch.float64 or not t.is_contiguous():
        return Float64Norm()(t)
    n = t.numel()
    if _POOL.buf is None or _POOL.buf.numel() < n:
        _POOL.buf = None  # the old one is freed before the new one is touched
        _POOL.buf = torch.empty(n, dtype=torch.float64)
    return float(torch.linalg.vector_norm(_POOL.buf[:n].copy_(t.reshape(-1))))


class StreamedNorm:
    """``Float64Norm()(t)`` for a flat tensor of ``n`` entries fed chunk by chunk in order
    (chunks start at multiples of the group size, as ``chunked``'s do). The values fed must
    have no -0.0 (magnitudes, or magnitudes times a 0/1 mask): +0 groups are the ones dropped."""

    def __init__(self, n: int, dtype: torch.dtype, group: int | None = None):
        self.n, self.dtype = n, dtype
        self.group = exact_group() if group is None else group
        self.main = n - n % self.group
        self.kept: list[np.ndarray] = []

    def add(self, part: slice, values: torch.Tensor) -> None:
        assert part.start % self.group == 0 and values.dtype == self.dtype
        bits = _as_bits(values.reshape(-1))
        end = max(0, min(part.stop, self.main) - part.start)
        if end:
            groups = bits[:end].reshape(-1, self.group)
            if self.group == 1:
                self.kept.append(groups.reshape(-1))
            else:
                self.kept.append(np.compress(_nonzero_rows(groups), groups, axis=0).reshape(-1))
        if end < bits.size:  # the tensor's tail, kept as it is
            self.kept.append(bits[end:])

    def value(self) -> float:
        kept, self.kept = self.kept, []
        if not kept or sum(k.size for k in kept) == 0:
            return 0.0  # every group was zero: the whole tensor's norm is sqrt(0.0)
        return float64_norm(_from_bits(np.concatenate(kept), self.dtype))


def _nonzero_rows(groups: np.ndarray) -> np.ndarray:
    """Rows of ``groups`` with any nonzero bit pattern (word-wise OR over each row)."""
    words = groups.view(np.uint64) if groups.shape[1] * groups.itemsize % 8 == 0 else groups
    any_bits = words[:, 0].copy()
    for j in range(1, words.shape[1]):
        any_bits |= words[:, j]
    return any_bits != 0


def _streamed_norm(x: torch.Tensor, group: int, chunk: int) -> float:
    norm = StreamedNorm(x.numel(), x.dtype, group)
    for start in range(0, x.numel(), chunk):
        norm.add(slice(start, min(x.numel(), start + chunk)), x[start:start + chunk])
    return norm.value()


@lru_cache(maxsize=1)
def exact_group() -> int:
    """The smallest of ``GROUPS`` whose zero groups can be dropped with ``Float64Norm``'s bits
    on this machine's kernel (checked on 32 sparse random tensors of every length mod 16; a group
    that is no multiple of the lanes changes the order of the sums there), else 1 (keep all)."""
    for group in GROUPS:
        g = torch.Generator().manual_seed(20261201)
        if all(_streamed_norm(x, group, 1024) == Float64Norm()(x)
               for x in (_probe(16384 + extra, g) for extra in range(32))):
            return group
    return 1


def _probe(n: int, g: torch.Generator) -> torch.Tensor:
    """Sparse magnitudes of one scale: a wrong group changes the order of the sums, which shows
    in the last bits of about half of these (so 32 of them all passing is no accident)."""
    return torch.randn(n, generator=g).abs_() * torch.rand(n, generator=g).lt(0.3)
