"""What a tensor is before it is read: one descriptor (name, shape, dtype) and the one table of
dtype names and safetensors codes that every reader and writer uses.

Torch-free on purpose: a header is planned from its safetensors dtype code (``"BF16"``), so
``mergewise merge --dry-run`` checks a recipe against its checkpoints without importing torch
(``lazytorch``); the torch dtype is looked up only when a tensor is read or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors code -> (torch attribute name, bytes per entry, floating point)
_CODES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
}
SAFETENSORS_CODES: tuple[str, ...] = tuple(_CODES)
# the floating-point dtypes a recipe may name for computing (``dtype``) and writing (``out_dtype``)
FLOAT_DTYPE_NAMES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
DEFAULT_COMPUTE_DTYPE = "float32"  # when a recipe gives no dtype (mergekit: the inputs' dtype)
_NAME_CODES = {name: code for code, (name, _, _) in _CODES.items()}


def code_of(dtype: torch.dtype | str) -> str:
    """The safetensors code of a torch dtype or of a dtype name (``"bfloat16"`` -> ``"BF16"``);
    a torch dtype outside the table (complex...) keeps its torch name, so it can still be read
    and reported (the writer refuses it, naming it)."""
    if isinstance(dtype, str):
        return dtype if dtype in _CODES else _NAME_CODES.get(dtype, dtype)
    name = str(dtype).removeprefix("torch.")
    return _NAME_CODES.get(name, name)


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per entry of a torch dtype, safetensors code or dtype name (torch-free for the
    table's dtypes)."""
    entry = _CODES.get(code_of(dtype))
    return entry[1] if entry else torch_dtype(code_of(dtype)).itemsize


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code or dtype name (imports torch)."""
    import torch

    entry = _CODES.get(code)
    return getattr(torch, entry[0] if entry else code)


def float_dtype(name: str) -> torch.dtype:
    """A recipe's ``dtype`` / ``out_dtype`` name (one of FLOAT_DTYPE_NAMES) as a torch dtype."""
    if name not in FLOAT_DTYPE_NAMES:
        raise KeyError(name)
    return torch_dtype(name)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` (or ``"BF16"``) -> ``"bfloat16"`` (config files, metadata, messages)."""
    code = code_of(dtype)
    entry = _CODES.get(code)
    return entry[0] if entry else code


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype a name such as ``"float32"`` stands for, or None."""
    import torch

    found = getattr(torch, name, None) if name.isidentifier() else None
    return found if isinstance(found, torch.dtype) else None


@dataclass(frozen=True, init=False)
class TensorInfo:
    """A tensor as a header describes it: enough to plan a merge or a file before reading data.
    ``source`` names where it lives (a file, a checkpoint label) when it is an input. The dtype
    is kept as its safetensors code (``code``); ``dtype`` is the torch dtype."""

    name: str
    shape: tuple[int, ...]
    code: str
    source: str

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | str,
                 source: str = "") -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "code", code_of(dtype))
        object.__setattr__(self, "source", source)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.code)

    @property
    def itemsize(self) -> int:
        return itemsize(self.code)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        entry = _CODES.get(self.code)
        return entry[2] if entry else self.dtype.is_floating_point
