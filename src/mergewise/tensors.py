"""What a tensor is before it is read: one descriptor (name, shape, dtype) and the one table of
dtype names and safetensors codes that every reader and writer uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# the floating-point dtypes a recipe may name for computing (``dtype``) and writing (``out_dtype``)
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                        "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_COMPUTE_DTYPE = "float32"  # when a recipe gives no dtype (mergekit: the inputs' dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (config files, metadata and messages)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype a name such as ``"float32"`` stands for, or None."""
    found = getattr(torch, name, None) if name.isidentifier() else None
    return found if isinstance(found, torch.dtype) else None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a header describes it: enough to plan a merge or a file before reading data.
    ``source`` names where it lives (a file, a checkpoint label) when it is an input."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point
