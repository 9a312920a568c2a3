"""Comparing a method's output with hand-computed values."""

from __future__ import annotations

from typing import Any

import torch

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_values(out: torch.Tensor, expected: Any, tol: float | None = None) -> None:
    """``out`` equals ``expected`` (nested lists or a tensor) to ``tol`` (absolute and
    relative), by default the output dtype's: 1e-12 for float64, 1e-6 for float32."""
    tol = TOLERANCE[out.dtype] if tol is None else tol
    torch.testing.assert_close(out, torch.as_tensor(expected, dtype=out.dtype), rtol=tol, atol=tol)
