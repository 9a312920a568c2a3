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

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from .numerics import Float64Norm
from .scratch import scratch

GROUPS = (4, 8)  # the float64 lanes of AVX2 (and of torch's scalar fallback), of AVX-512

_BITS = {1: ("int8", np.uint8), 2: ("int16", np.uint16), 4: ("int32", np.uint32),
         8: ("int64", np.uint64)}  # torch's by name: importing this module imports no torch


def _as_bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a flat CPU tensor as unsigned integers of its item size."""
    signed_name, unsigned = _BITS[t.element_size()]
    signed = getattr(torch, signed_name)
    return t.view(signed).numpy().view(unsigned)


def _from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits).view(getattr(torch, _BITS[bits.itemsize][0])).view(dtype)


def float64_norm(t: torch.Tensor) -> float:
    """``Float64Norm()(t)``, the same bits (the same float64 values, contiguous, the same
    kernel), through this thread's ``scratch`` buffer for contiguous CPU tensors."""
    if t.device.type != "cpu" or t.dtype == torch.float64 or not t.is_contiguous():
        return Float64Norm()(t)
    buf = scratch(t.numel(), torch.float64)
    return float(torch.linalg.vector_norm(buf.copy_(t.reshape(-1))))


class StreamedNorm:
    """``Float64Norm()(t)`` for a flat tensor of ``n`` entries fed chunk by chunk in order
    (chunks start at multiples of the group size, as ``chunked``'s do). The values fed must
    have no -0.0 (magnitudes, or magnitudes times a 0/1 mask): +0 groups are the ones dropped.
    ``value(keep)`` may zero more of what was stored first (TADrop stores every candidate for
    the kept set while its threshold is still unknown)."""

    def __init__(self, n: int, dtype: torch.dtype, group: int | None = None):
        self.n, self.dtype = n, dtype
        self.group = exact_group() if group is None else group
        self.main = n - n % self.group
        # (chunk, flat index of the piece's first entry, bits, which groups were kept or None)
        self.pieces: list[tuple[slice, int, np.ndarray, np.ndarray | None]] = []

    def add(self, part: slice, values: torch.Tensor) -> None:
        assert part.start % self.group == 0 and values.dtype == self.dtype
        bits = _as_bits(values.reshape(-1))
        end = max(0, min(part.stop, self.main) - part.start)
        if end:
            groups = bits[:end].reshape(-1, self.group)
            rows = _nonzero_rows(groups) if self.group > 1 else None
            kept = groups if rows is None else np.compress(rows, groups, axis=0)
            self.pieces.append((part, part.start, kept.reshape(-1), rows))
        if end < bits.size:  # the tensor's tail, kept as it is
            self.pieces.append((part, part.start + end, bits[end:], None))

    def value(self, keep: Callable[[slice, torch.Tensor, Callable[[], torch.Tensor]],
                                   torch.Tensor] | None = None) -> float:
        """The norm of what was fed, after ``keep(chunk, values, indices)`` where given."""
        pieces, self.pieces = self.pieces, []
        out = []
        for part, first, bits, rows in pieces:
            if keep is not None and bits.size:
                values = keep(part, _from_bits(bits, self.dtype),
                              lambda f=first, b=bits, r=rows: self._indices(f, b.size, r))
                bits = _as_bits(values)
            out.append(bits)
        if sum(b.size for b in out) == 0:
            return 0.0  # every group was zero: the whole tensor's norm is sqrt(0.0)
        return float64_norm(_from_bits(np.concatenate(out), self.dtype))

    def _indices(self, first: int, size: int, rows: np.ndarray | None) -> torch.Tensor:
        if rows is None:
            return torch.arange(first, first + size)
        starts = torch.from_numpy(np.flatnonzero(rows)) * self.group + first
        return (starts[:, None] + torch.arange(self.group)).reshape(-1)


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
