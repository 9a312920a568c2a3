"""Per-thread scratch buffers reused across tensors: a fresh full-size buffer costs its page
faults, several times a cheap pass over it (a float64 copy for a norm, |tau| for quantiles).
Each buffer grows to the largest size asked of it and stays for the process; only one user at
a time per (thread, dtype), who must not keep it past its own call."""

from __future__ import annotations

import threading

import torch


class _Pool(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}


_POOL = _Pool()


def scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor of ``n`` entries of ``dtype`` (contents undefined), this thread's."""
    buf = _POOL.buffers.get(dtype)
    if buf is None or buf.numel() < n:
        _POOL.buffers.pop(dtype, None)  # the old one is freed before the new one is touched
        buf = _POOL.buffers[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]
