"""Reading a merge's inputs: a one-tensor-ahead prefetching thread, the ``--device`` check,
and the readers that upcast, check and subtract (``TensorReader``) or align vocabulary rows
(``VocabReader``) for the engine and the chunked path."""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import torch

from .checkpoint import Checkpoint, StateDictCheckpoint
from .errors import MergewiseError, short_repr
from .numerics import all_finite, check_finite
from .tensors import torch_dtype
from .vocab import Alignment


class Prefetcher:
    """Reads the next tensor's inputs on a background thread while the current one is merged
    (positional file reads release the GIL, as torch's kernels do). One tensor ahead at most,
    so memory grows by one tensor per input; in-memory inputs are never prefetched."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergewise-read")
        self._pending: dict[tuple[int, str], Future[torch.Tensor]] = {}

    def ahead(self, reads: Sequence[tuple[Checkpoint, str]]) -> None:
        for ckpt, name in reads:
            key = (id(ckpt), name)
            if (key not in self._pending and not isinstance(ckpt, StateDictCheckpoint)
                    and ckpt.prefetches(name)):
                self._pending[key] = self._pool.submit(ckpt.read, name)

    def take(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        future = self._pending.pop((id(ckpt), name), None)
        return future.result() if future is not None else ckpt.read(name)

    def forget(self, reads: Sequence[tuple[Checkpoint, str]]) -> None:
        """Drop what was read ahead for a tensor and not used (so nothing piles up)."""
        for ckpt, name in reads:
            future = self._pending.pop((id(ckpt), name), None)
            if future is not None:
                future.cancel()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


def compute_device(device: str | torch.device) -> torch.device:
    """The one check of ``--device`` (merge, materialize, inspect), before any tensor is read:
    ``cpu``, ``cuda`` or ``cuda:N`` of a GPU torch sees; anything else (``meta``, ``mps``, a
    typo) is one line, not a torch error mid-merge or a merge of empty meta tensors."""
    return torch.device(checked_device(device))


def checked_device(device: str | torch.device) -> str:
    """``compute_device``'s check, giving the device's text; ``cpu`` is accepted without asking
    torch anything (a dry run on the CPU imports no torch)."""
    text = str(device)
    if text == "cpu":
        return text
    match = re.fullmatch(r"cuda(?::([0-9]{1,4}))?", text)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sees = (f"torch sees {count} CUDA device{'s' if count != 1 else ''}" if count
            else "torch sees no CUDA device")
    shown = short_repr(text, 40)
    if match is None:
        raise MergewiseError(f"--device {shown}: give cpu, cuda or cuda:N ({sees})")
    if count == 0 or int(match.group(1) or 0) >= count:
        raise MergewiseError(f"--device {shown}: {sees}; use --device cpu"
                             + (f" or cuda:0..{count - 1}" if count else ""))
    return text


class TensorReader:
    """Read one tensor, move it to the compute device, upcast it, check it is finite. May
    return the caller's own tensor (in-memory inputs already in the compute dtype): never
    modify the result in place. While ``prefetch`` is set, reads come from it."""

    def __init__(self, device: str | torch.device, dtype: torch.dtype | str):
        # kept as text until a tensor is read: planning (a dry run) imports no torch
        self._device = checked_device(device)
        self._dtype = dtype
        self.prefetch: Prefetcher | None = None

    @cached_property
    def device(self) -> torch.device:
        return torch.device(self._device)

    @cached_property
    def dtype(self) -> torch.dtype:
        return self._dtype if not isinstance(self._dtype, str) else torch_dtype(self._dtype)

    def raw(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        return self.prefetch.take(ckpt, name) if self.prefetch else ckpt.read(name)

    def stored(self, name: str) -> TensorReader | None:
        """The reader that hands out ``name`` as stored (vocabulary readers may not)."""
        return self

    def __call__(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        return self.upcast(self.raw(ckpt, name), ckpt.label, name)

    def upcast(self, raw: torch.Tensor, label: str, name: str) -> torch.Tensor:
        t = raw.to(device=self.device, dtype=self.dtype)
        check_finite(t, label, name)
        return t

    def delta(self, ckpt: Checkpoint, name: str, base: torch.Tensor,
              over: tuple[Checkpoint, str] | None = None) -> torch.Tensor:
        """``ckpt``'s task vector at ``name``; ``over``: the (checkpoint, name) ``base`` was
        read from, so that a checkpoint storing the task vector itself (a LoRA adapter on that
        base) gives it exactly (``Checkpoint.delta_over``)."""
        if over is not None and over[1] == name:
            stored = ckpt.delta_over(over[0], name, self.dtype, self.device)
            if stored is not None:
                check_finite(stored, ckpt.label, name)
                return stored
        return self.delta_of(self.raw(ckpt, name), ckpt.label, name, base)

    def delta_of(self, raw: torch.Tensor, label: str, name: str, base: torch.Tensor
                 ) -> torch.Tensor:
        """``upcast(raw) - base`` in one full-size buffer: a narrower stored dtype (bf16 under
        float32 compute) converts exactly, so the values are those of the promoted subtraction
        (whose mixed-dtype kernel is ~2x slower than a cast and a float32 one); the finite
        check runs on the task vector, and only when it fails on the input (a finite input
        whose task vector overflows passes, as before)."""
        raw = raw.to(device=self.device)
        if torch.promote_types(raw.dtype, self.dtype) != self.dtype or raw.dtype == torch.bool:
            upcast = raw.to(dtype=self.dtype)  # a new tensor: the dtypes differ
            check_finite(upcast, label, name)
            return upcast.sub_(base)
        if raw.dtype != self.dtype:
            delta = raw.to(dtype=self.dtype).sub_(base)
        else:  # never in place: raw may be the caller's own tensor
            delta = torch.sub(raw, base)
        if not all_finite(delta):
            check_finite(raw, label, name)
        return delta


class VocabReader:
    """A ``TensorReader`` that hands out vocabulary tensors (embeddings, head) with their rows
    aligned to the output vocabulary: all inputs of such a tensor are read and aligned together
    (a missing token's row depends on which models have it) and kept for that tensor only."""

    def __init__(self, read: TensorReader, alignment: Alignment, inputs: Sequence[Checkpoint],
                 names: set[str]):
        self.read, self.alignment, self.names = read, alignment, names
        self.inputs = list(inputs)
        self.device, self.dtype = read.device, read.dtype
        self._name: str | None = None
        self._aligned: list[torch.Tensor] = []

    def stored(self, name: str) -> TensorReader | None:
        """The plain reader when ``name`` is read as stored, None when it is vocabulary-aligned."""
        return None if name in self.names else self.read

    def __call__(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        if name not in self.names:
            return self.read(ckpt, name)
        if self._name != name:
            self._aligned = []  # free the previous tensor's rows first
            self._aligned = self.alignment.align([self.read(c, name) for c in self.inputs])
            self._name = name
        return self._aligned[next(i for i, c in enumerate(self.inputs) if c is ckpt)]

    def delta(self, ckpt: Checkpoint, name: str, base: torch.Tensor,
              over: tuple[Checkpoint, str] | None = None) -> torch.Tensor:
        if name not in self.names:
            return self.read.delta(ckpt, name, base, over)
        return self(ckpt, name) - base
