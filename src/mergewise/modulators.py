"""Per-task modulators of a task-specific merge (EMR): collect, store, validate, assemble.

``modulators.safetensors`` (written next to the unified model by ``mergewise merge``):

- ``mask.<t>.<tensor>``: uint8 ``[ceil(n / 8)]``, task t's mask of a merged tensor with n
  entries, 1 bit per entry: entry i of the row-major flattened tensor is bit ``i % 8`` of byte
  ``i // 8``, least significant bit first (``numpy.packbits(..., bitorder="little")``); the
  padding bits of the last byte are 0. ``t`` is the task's index in the ``tasks`` list.
- ``rescalers``: float64 ``[K]``, lambda_t in task order.
- ``base_checksums``: float64 ``[N, 2]``, (sum, sum of |x|) of each merged base tensor in the
  compute dtype, in ``tensors`` order: ``materialize`` refuses a different base.
- header metadata (strings): ``format`` = ``mergewise-emr-modulators``, ``format_version`` =
  ``1``, ``bit_order`` = ``little``, ``tasks`` (JSON list of task names, from the recipe's model
  ``name`` fields), ``tensors`` (JSON {name: shape} of the merged tensors, in write order),
  ``compute_dtype``, ``base_model`` (the base's absolute path at merge time, or empty).

Task t's model: every merged tensor is theta0 + lambda_t * (M_t * (unified - theta0)) in the
compute dtype, cast to the unified tensor's dtype; other tensors (integer buffers) are copied
from the unified model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, SafetensorsFile
from .errors import ModulatorError, NonFiniteError, UnknownTaskError
from .methods.emr import EMRTensor, assemble, rescalers
from .numerics import all_finite
from .tensors import TensorInfo, dtype_from_name, dtype_name
from .writer import StreamingSafetensorsFile

FILE_NAME = "modulators.safetensors"
FORMAT = "mergewise-emr-modulators"
FORMAT_VERSION = "1"
BIT_ORDER = "little"
RESCALERS = "rescalers"
CHECKSUMS = "base_checksums"
CHECKSUM_RTOL = 1e-6


def mask_key(task_index: int, name: str) -> str:
    return f"mask.{task_index}.{name}"


def packed_length(numel: int) -> int:
    return (numel + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor -> uint8 [ceil(n / 8)], 1 bit per entry, least significant bit first."""
    bits = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(bits, bitorder=BIT_ORDER))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int], where: str = "mask") -> torch.Tensor:
    """Inverse of ``pack_mask``; checks the length and that the padding bits are 0."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (packed_length(numel),):
        raise ModulatorError(f"{where}: expected uint8 [{packed_length(numel)}] (1 bit per entry of "
                             f"a {list(shape)} tensor), got {dtype_name(packed.dtype)}"
                             f" {list(packed.shape)}; the modulators file is corrupt")
    bits = np.unpackbits(packed.numpy(), bitorder=BIT_ORDER)
    if bits[numel:].any():
        raise ModulatorError(f"{where}: padding bits are set; the modulators file is corrupt")
    return torch.from_numpy(bits[:numel].astype(bool)).reshape(tuple(shape))


def modulator_layout(tasks: Sequence[str], tensors: Sequence[tuple[str, tuple[int, ...]]]
                     ) -> list[TensorInfo]:
    """Every entry of the modulators file, in write order (masks tensor by tensor, then the
    rescalers and checksums)."""
    out = [TensorInfo(mask_key(t, name), (packed_length(math.prod(shape)),), torch.uint8)
           for name, shape in tensors for t in range(len(tasks))]
    return out + [TensorInfo(RESCALERS, (len(tasks),), torch.float64),
                  TensorInfo(CHECKSUMS, (len(tensors), 2), torch.float64)]


def modulator_metadata(tasks: Sequence[str], tensors: Sequence[tuple[str, tuple[int, ...]]],
                       compute_dtype: torch.dtype, base_model: str | None) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "bit_order": BIT_ORDER,
            "tasks": json.dumps(list(tasks)),
            "tensors": json.dumps({name: list(shape) for name, shape in tensors}),
            "compute_dtype": dtype_name(compute_dtype),
            "base_model": base_model or ""}


class ModulatorCollector:
    """The engine's modulator sink for EMR: packs each merged tensor's masks (handed to
    ``write`` in layout order) and sums the rescalers' per-tensor means.

    The denominators use the stored unified tensor (unified - theta0 in the compute dtype), so
    the rescalers match what ``materialize`` will compute from the files.
    """

    def __init__(self, tasks: Sequence[str], write: Callable[[str, torch.Tensor], None]):
        self.tasks = list(tasks)
        self.write = write
        self.numerators = [0.0] * len(tasks)
        self.denominators = [0.0] * len(tasks)
        self.checksums: list[tuple[float, float]] = []
        self.mask_bytes = 0

    def __call__(self, name: str, base: torch.Tensor | None, stored: torch.Tensor,
                 modulators: EMRTensor | None) -> None:
        assert base is not None
        if modulators is None:  # every task vector was zero: the base, no entry kept
            empty = torch.zeros(stored.shape, dtype=torch.bool)
            masks = [empty] * len(self.tasks)
        else:
            masks = modulators.masks
            if modulators.abs_means is not None:  # None: no rescaling (TALL masks), lambda_t 1
                tau_abs = (stored.to(device=base.device, dtype=base.dtype) - base).abs_()
                for t, mask in enumerate(masks):
                    self.numerators[t] += modulators.abs_means[t]
                    if tau_abs.numel():
                        self.denominators[t] += float((tau_abs * mask).mean(dtype=torch.float64))
        for t, mask in enumerate(masks):
            packed = pack_mask(mask)
            self.mask_bytes += packed.numel()
            self.write(mask_key(t, name), packed)
        self.checksums.append((float(base.sum(dtype=torch.float64)),
                               float(base.abs().sum(dtype=torch.float64))))

    def rescalers(self) -> list[float]:
        return rescalers(self.numerators, self.denominators)

    def finish(self) -> None:
        """Write the rescalers and the base checksums (after every merged tensor)."""
        self.write(RESCALERS, torch.tensor(self.rescalers(), dtype=torch.float64))
        self.write(CHECKSUMS, torch.tensor(self.checksums, dtype=torch.float64).reshape(-1, 2))


class ModulatorFileWriter:
    """Streams the collector's entries into ``modulators.safetensors`` (header planned first)."""

    def __init__(self, path: Path, tasks: Sequence[str],
                 tensors: Sequence[tuple[str, tuple[int, ...]]], compute_dtype: torch.dtype,
                 base_model: str | None):
        self.file = StreamingSafetensorsFile(
            path, modulator_layout(tasks, tensors),
            modulator_metadata(tasks, tensors, compute_dtype, base_model))
        self.collector = ModulatorCollector(tasks, self.file.write)

    def finalize(self) -> None:
        self.collector.finish()
        self.file.close()


def _json(meta: Mapping[str, str], key: str, label: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        raise ModulatorError(f"{label}: metadata '{key}' is missing or not JSON; the modulators "
                             "file is corrupt or was not written by mergewise") from None


class Modulators:
    """Validated modulators of a task-specific merge, read from a checkpoint-like source."""

    def __init__(self, source: Checkpoint | SafetensorsFile, metadata: Mapping[str, str],
                 label: str):
        self.source, self.label = source, label
        if metadata.get("format") != FORMAT:
            raise ModulatorError(f"{label}: not an EMR modulators file (format "
                                 f"{metadata.get('format')!r}, expected {FORMAT!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ModulatorError(f"{label}: modulators format version "
                                 f"{metadata.get('format_version')!r}; this mergewise reads "
                                 f"version {FORMAT_VERSION}: re-run the merge")
        if metadata.get("bit_order") != BIT_ORDER:
            raise ModulatorError(f"{label}: bit order {metadata.get('bit_order')!r}, expected "
                                 f"{BIT_ORDER!r}")
        tasks, shapes = _json(metadata, "tasks", label), _json(metadata, "tensors", label)
        if not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)
                and isinstance(shapes, dict)):
            raise ModulatorError(f"{label}: metadata 'tasks'/'tensors' have the wrong type; the "
                                 "modulators file is corrupt")
        self.tasks: list[str] = tasks
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in shapes.items()}
        compute = dtype_from_name(metadata.get("compute_dtype", "float32"))
        if compute is None or not compute.is_floating_point:
            raise ModulatorError(f"{label}: metadata 'compute_dtype' = "
                                 f"{metadata.get('compute_dtype')!r} is not a float dtype; the "
                                 "modulators file is corrupt")
        self.compute_dtype = compute
        self.base_model = metadata.get("base_model") or None
        names = set(source.names())
        expected = modulator_layout(self.tasks, list(self.shapes.items()))
        for entry in expected:
            if entry.name not in names:
                raise ModulatorError(f"{label}: entry '{entry.name}' is missing; the modulators "
                                     "file is corrupt or truncated")
            info = source.info(entry.name)
            if info.shape != entry.shape or info.dtype != entry.dtype:
                raise ModulatorError(
                    f"{label}: entry '{entry.name}' is {dtype_name(info.dtype)} "
                    f"{list(info.shape)}, expected {dtype_name(entry.dtype)} "
                    f"{list(entry.shape)}; the modulators file is corrupt")
        lam = source.read(RESCALERS)
        if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
            raise ModulatorError(f"{label}: rescalers {lam.tolist()} are not finite and >= 0")
        self.rescalers: dict[str, float] = dict(zip(self.tasks, lam.tolist(), strict=True))
        sums = source.read(CHECKSUMS)
        self.checksums = {n: (float(s[0]), float(s[1])) for n, s in zip(self.shapes, sums,
                                                                          strict=True)}

    @classmethod
    def open(cls, path: Path) -> Modulators:
        if not path.is_file():
            raise ModulatorError(f"{path}: no such file; materialize needs the output directory "
                                 f"of a task-specific merge (merge_method: emr), which holds "
                                 f"{FILE_NAME}")
        source = SafetensorsFile(path)
        try:
            return cls(source, source.metadata, str(path))
        except BaseException:
            source.close()
            raise

    def close(self) -> None:
        self.source.close()

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise UnknownTaskError(f"{self.label}: no task '{task}'; known tasks: "
                                   f"{', '.join(self.tasks)}")
        return self.tasks.index(task)

    def mask(self, task_index: int, name: str) -> torch.Tensor:
        key = mask_key(task_index, name)
        return unpack_mask(self.source.read(key), self.shapes[name], f"{self.label}: {key}")

    @property
    def nbytes(self) -> int:
        return sum(self.source.info(n).nbytes for n in self.source.names())

    def check_models(self, unified: Checkpoint, base: Checkpoint) -> None:
        """Every merged tensor is in the unified model and the base with its shape; the unified
        model has no other floating-point tensor."""
        for ckpt, what in ((unified, "unified model"), (base, "base")):
            names = set(ckpt.names())
            for name, shape in self.shapes.items():
                if name not in names:
                    raise ModulatorError(f"{ckpt.label}: the {what} has no tensor '{name}', "
                                         f"which {self.label} has masks for; wrong {what}?")
                if ckpt.info(name).shape != shape:
                    raise ModulatorError(
                        f"{ckpt.label}: tensor '{name}' of the {what} has shape "
                        f"{list(ckpt.info(name).shape)}, the modulators have {list(shape)}")
        extra = [n for n in unified.names() if n not in self.shapes and unified.info(n).is_float]
        if extra:
            raise ModulatorError(f"{unified.label}: floating-point tensor '{extra[0]}' has no "
                                 f"masks in {self.label}; the files do not belong together")

    def check_base_tensor(self, name: str, base: torch.Tensor, label: str) -> None:
        total, total_abs = self.checksums[name]
        got = float(base.sum(dtype=torch.float64))
        if abs(got - total) > CHECKSUM_RTOL * total_abs + 1e-30:
            raise ModulatorError(f"{label}: tensor '{name}' differs from the base this merge used "
                                 f"(sum {got!r}, expected {total!r}); pass the merge's base "
                                 "(--base / base=)")

    def task_tensors(self, task: str, unified: Checkpoint, base: Checkpoint,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, weight) of task ``task``'s model, in the unified model's tensor order."""
        t = self.task_index(task)
        self.check_models(unified, base)
        lam = self.rescalers[task]
        for name in unified.names():
            stored = unified.read(name)
            if name not in self.shapes:
                yield name, stored.clone()  # integer buffers: as in the unified model
                continue
            theta0 = base.read(name).to(device=device, dtype=self.compute_dtype)
            self.check_base_tensor(name, theta0, base.label)
            out = assemble(theta0, stored, self.mask(t, name), lam).to(dtype=stored.dtype)
            if not all_finite(out):
                raise NonFiniteError(f"{self.label}: task '{task}' tensor '{name}' overflows "
                                     f"{dtype_name(stored.dtype)} (rescaler "
                                     f"{lam!r}); merge with a wider out_dtype")
            yield name, out.cpu()
