"""Per-task modulators of a task-specific merge (EMR): collect, store, validate, assemble.

``modulators.safetensors`` (written next to the unified model by ``mergewise merge``):

- ``mask.<t>.<tensor>``: uint8 ``[ceil(n / 8)]``, task t's mask of a merged tensor with n
  entries, 1 bit per entry: entry i of the row-major flattened tensor is bit ``i % 8`` of byte
  ``i // 8``, least significant bit first (``numpy.packbits(..., bitorder="little")``); the
  padding bits of the last byte are 0. ``t`` is the task's index in the ``tasks`` list.
- ``rescalers``: float64 ``[K]``, lambda_t in task order; finite, > 0 and <= ``MAX_RESCALER``.
- ``digests``: uint8 ``[R, 32]``, sha256 digests (``payload_digest``) in ``digest_labels``
  order: ``header`` (the ``tasks`` and ``tensors`` metadata), ``rescalers``, then per merged
  tensor ``base:<name>`` (the base tensor as the merge used it: in the compute dtype),
  ``unified:<name>`` (the unified model's tensor as written) and ``mask.<t>.<name>`` for every
  task. ``materialize`` / ``load_task`` check each one before the payload is used, so a
  permuted base, a flipped mask bit, an edited rescaler or a renamed task is refused.
- header metadata (strings): ``format`` = ``mergewise-emr-modulators``, ``format_version`` =
  ``2`` (1: no digests, refused), ``bit_order`` = ``little``, ``digest`` = ``sha256``,
  ``tasks`` (JSON list of task names, from the recipe's model ``name`` fields), ``tensors``
  (JSON {name: shape} of the merged tensors, in write order), ``compute_dtype``,
  ``base_model`` (the base's absolute path at merge time, or empty).

Task t's model: every merged tensor is theta0 + lambda_t * (M_t * (unified - theta0)) in the
compute dtype, cast to the unified tensor's dtype; other tensors (integer buffers) are copied
from the unified model.

The digests live in a tensor entry written last rather than in the header metadata: the header
is written before the first mask (the file is streamed), when no digest is known yet.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
FORMAT_VERSION = "2"
BIT_ORDER = "little"
RESCALERS = "rescalers"
DIGESTS = "digests"
DIGEST = "sha256"
DIGEST_BYTES = 32
HEADER = "header"
# lambda_t = sum mean|tau_t| / sum mean|M_t tau_uni|, and |tau_uni| >= |tau_t| wherever M_t keeps
# an entry, so lambda_t <= (task t's magnitude) / (the part its mask keeps): a rescaler above
# 1e4 means the mask keeps under 1/10,000 of the task vector, and the task model is those few
# entries blown up 10,000-fold: noise, not a model. Real EMR rescalers are of order 1.
MAX_RESCALER = 1e4

Shapes = Sequence[tuple[str, tuple[int, ...]]]


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


# --- digests ---------------------------------------------------------------------------------

def payload_digest(label: str, tensor: torch.Tensor) -> bytes:
    """sha256 of a payload's label, dtype, shape and row-major bytes: the label binds a digest to
    its entry, so two same-shaped payloads swapped are refused too."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256(f"{label}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # hashlib drops the GIL
    return h.digest()


def header_digest(tasks: Sequence[str], tensors: Shapes) -> bytes:
    """sha256 of the task names and merged tensors (names, shapes, order) the masks refer to."""
    text = json.dumps({"tasks": list(tasks), "tensors": [[n, list(s)] for n, s in tensors]},
                      separators=(",", ":"))
    return hashlib.sha256(f"{HEADER}|{text}".encode()).digest()


def digest_labels(tasks: Sequence[str], tensors: Shapes) -> list[str]:
    """The row labels of the ``digests`` entry, in order."""
    out = [HEADER, RESCALERS]
    for name, _ in tensors:
        out += [f"base:{name}", f"unified:{name}", *(mask_key(t, name) for t in range(len(tasks)))]
    return out


def check_rescalers(values: Sequence[float], tasks: Sequence[str], label: str) -> None:
    """Refuse a rescaler that is not finite, not > 0 or above ``MAX_RESCALER`` (see there)."""
    for task, lam in zip(tasks, values, strict=True):
        if not (math.isfinite(lam) and 0.0 < lam <= MAX_RESCALER):
            raise ModulatorError(
                f"{label}: task '{task}' has rescaler {lam!r}, outside (0, {MAX_RESCALER:g}]: its "
                "mask keeps (almost) none of its task vector, so its model would be noise; leave "
                "the task out, sparsify it less, or re-run the merge if the file was edited")


class _DigestWorker:
    """sha256 of the payloads on one worker thread while the merge goes on (hashlib releases
    the GIL on large buffers). Only one tensor's payloads are in flight: ``submit`` waits for the
    previous ones, so at most one extra tensor is kept alive."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future[bytes]]] = []
        self.done: dict[str, bytes] = {}

    def submit(self, payloads: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergewise-digest")
        self._pending = [(label, self._pool.submit(payload_digest, label, t))
                         for label, t in payloads]

    def wait(self) -> None:
        for label, future in self._pending:
            self.done[label] = future.result()
        self._pending = []

    def close(self) -> dict[str, bytes]:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return self.done


# --- writing ---------------------------------------------------------------------------------

def modulator_layout(tasks: Sequence[str], tensors: Shapes) -> list[TensorInfo]:
    """Every entry of the modulators file, in write order (masks tensor by tensor, then the
    rescalers and the digests)."""
    out = [TensorInfo(mask_key(t, name), (packed_length(math.prod(shape)),), torch.uint8)
           for name, shape in tensors for t in range(len(tasks))]
    rows = len(digest_labels(tasks, tensors))
    return out + [TensorInfo(RESCALERS, (len(tasks),), torch.float64),
                  TensorInfo(DIGESTS, (rows, DIGEST_BYTES), torch.uint8)]


def modulator_metadata(tasks: Sequence[str], tensors: Shapes, compute_dtype: torch.dtype,
                       base_model: str | None) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "bit_order": BIT_ORDER,
            "digest": DIGEST, "tasks": json.dumps(list(tasks)),
            "tensors": json.dumps({name: list(shape) for name, shape in tensors}),
            "compute_dtype": dtype_name(compute_dtype),
            "base_model": base_model or ""}


class ModulatorCollector:
    """The engine's modulator sink for EMR: packs each merged tensor's masks (handed to
    ``write`` in layout order), sums the rescalers' per-tensor means and digests the base,
    unified and mask payloads as they stream by.

    The denominators use the stored unified tensor (unified - theta0 in the compute dtype), so
    the rescalers match what ``materialize`` will compute from the files.
    """

    def __init__(self, tasks: Sequence[str], write: Callable[[str, torch.Tensor], None]):
        self.tasks = list(tasks)
        self.write = write
        self.numerators = [0.0] * len(tasks)
        self.denominators = [0.0] * len(tasks)
        self.tensors: list[tuple[str, tuple[int, ...]]] = []
        self.mask_bytes = 0
        self._digests = _DigestWorker()

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
        payloads = [(f"base:{name}", base), (f"unified:{name}", stored)]
        for t, mask in enumerate(masks):
            packed = pack_mask(mask)
            self.mask_bytes += packed.numel()
            self.write(mask_key(t, name), packed)
            payloads.append((mask_key(t, name), packed))
        self.tensors.append((name, tuple(stored.shape)))
        self._digests.submit(payloads)

    def rescalers(self) -> list[float]:
        return rescalers(self.numerators, self.denominators)

    def finish(self) -> None:
        """Write the rescalers and the digests (after every merged tensor); a rescaler out of
        bounds fails the merge here rather than every later ``materialize``."""
        done = self._digests.close()
        lam = self.rescalers()
        check_rescalers(lam, self.tasks, "EMR merge")
        values = torch.tensor(lam, dtype=torch.float64)
        self.write(RESCALERS, values)
        done[HEADER] = header_digest(self.tasks, self.tensors)
        done[RESCALERS] = payload_digest(RESCALERS, values)
        rows = b"".join(done[label] for label in digest_labels(self.tasks, self.tensors))
        self.write(DIGESTS, torch.frombuffer(bytearray(rows), dtype=torch.uint8)
                   .reshape(-1, DIGEST_BYTES))


class ModulatorFileWriter:
    """Streams the collector's entries into ``modulators.safetensors`` (header planned first)."""

    def __init__(self, path: Path, tasks: Sequence[str], tensors: Shapes,
                 compute_dtype: torch.dtype, base_model: str | None):
        self.file = StreamingSafetensorsFile(
            path, modulator_layout(tasks, tensors),
            modulator_metadata(tasks, tensors, compute_dtype, base_model))
        self.collector = ModulatorCollector(tasks, self.file.write)

    def finalize(self) -> None:
        self.collector.finish()
        self.file.close()


# --- reading ---------------------------------------------------------------------------------

def _corrupt(label: str, what: str) -> ModulatorError:
    return ModulatorError(f"{label}: {what}; the modulators file is corrupt or was not written by "
                          "mergewise: re-run the merge")


def _json(meta: Mapping[str, str], key: str, label: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        raise _corrupt(label, f"metadata '{key}' is missing or not JSON") from None


def _is_shape(value: object) -> bool:
    return isinstance(value, list) and all(type(s) is int and s >= 0 for s in value)


def _check_header(metadata: object, label: str) -> Mapping[str, str]:
    """The header metadata, refused unless it is this format's, version and digest."""
    if not isinstance(metadata, Mapping) or not all(isinstance(v, str)
                                                    for v in metadata.values()):
        raise _corrupt(label, "header metadata is not a map of strings")
    if metadata.get("format") != FORMAT:
        raise ModulatorError(f"{label}: not an EMR modulators file (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
    version = metadata.get("format_version")
    if version == "1":
        raise ModulatorError(f"{label}: written by an older mergewise (modulators format 1, "
                             "before integrity digests), which cannot be verified; re-run the "
                             "merge")
    if version != FORMAT_VERSION:
        raise ModulatorError(f"{label}: modulators format version {version!r}; this mergewise "
                             f"reads version {FORMAT_VERSION}: re-run the merge")
    if metadata.get("bit_order") != BIT_ORDER:
        raise ModulatorError(f"{label}: bit order {metadata.get('bit_order')!r}, expected "
                             f"{BIT_ORDER!r}")
    if metadata.get("digest") != DIGEST:
        raise _corrupt(label, f"digest {metadata.get('digest')!r}, expected {DIGEST!r}")
    return metadata


class Modulators:
    """Validated modulators of a task-specific merge, read from a checkpoint-like source.

    The header, the rescalers and the digests are checked at open; each tensor's base, unified
    and mask payloads against their digests when they are read (``task_tensors``).
    """

    def __init__(self, source: Checkpoint | SafetensorsFile, metadata: Mapping[str, str],
                 label: str):
        self.source, self.label = source, label
        meta = _check_header(metadata, label)
        tasks, shapes = _json(meta, "tasks", label), _json(meta, "tensors", label)
        if not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)
                and len(set(tasks)) == len(tasks) and isinstance(shapes, dict)
                and all(_is_shape(s) for s in shapes.values())):
            raise _corrupt(label, "metadata 'tasks' (distinct names) or 'tensors' ({name: "
                                  "shape}) has the wrong type")
        self.tasks: list[str] = tasks
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in shapes.items()}
        compute = dtype_from_name(meta.get("compute_dtype", "float32"))
        if compute is None or not compute.is_floating_point:
            raise _corrupt(label, f"metadata 'compute_dtype' = {meta.get('compute_dtype')!r} is "
                                  "not a float dtype")
        self.compute_dtype = compute
        self.base_model = meta.get("base_model") or None
        self._check_entries()
        rows = source.read(DIGESTS).contiguous().numpy().tobytes()
        labels = digest_labels(self.tasks, list(self.shapes.items()))
        self.digests = {lab: rows[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]
                        for i, lab in enumerate(labels)}
        if header_digest(self.tasks, list(self.shapes.items())) != self.digests[HEADER]:
            raise _corrupt(label, "metadata 'tasks'/'tensors' do not match their digest (tasks "
                                  "renamed or reordered?)")
        lam = self.verified(RESCALERS, source.read(RESCALERS))
        check_rescalers(lam.tolist(), self.tasks, label)
        self.rescalers: dict[str, float] = dict(zip(self.tasks, lam.tolist(), strict=True))

    def _check_entries(self) -> None:
        names = set(self.source.names())
        for entry in modulator_layout(self.tasks, list(self.shapes.items())):
            if entry.name not in names:
                raise _corrupt(self.label, f"entry '{entry.name}' is missing (truncated?)")
            info = self.source.info(entry.name)
            if info.shape != entry.shape or info.dtype != entry.dtype:
                raise _corrupt(self.label, f"entry '{entry.name}' is {dtype_name(info.dtype)} "
                                           f"{list(info.shape)}, expected "
                                           f"{dtype_name(entry.dtype)} {list(entry.shape)}")

    def verified(self, key: str, payload: torch.Tensor) -> torch.Tensor:
        """``payload`` of entry ``key`` of this file, refused unless it matches its digest."""
        if payload_digest(key, payload) != self.digests[key]:
            raise _corrupt(self.label, f"entry '{key}' does not match its {DIGEST} digest")
        return payload

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
        packed = self.verified(key, self.source.read(key))
        return unpack_mask(packed, self.shapes[name], f"{self.label}: {key}")

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
        """``base`` (in the compute dtype) is the very tensor the merge used, bit for bit."""
        if payload_digest(f"base:{name}", base) != self.digests[f"base:{name}"]:
            raise ModulatorError(f"{label}: tensor '{name}' differs from the base this merge used "
                                 f"({DIGEST} of its {dtype_name(self.compute_dtype)} values does "
                                 f"not match {self.label}); pass the merge's base (--base / base=)")

    def check_unified_tensor(self, name: str, stored: torch.Tensor, label: str) -> None:
        if payload_digest(f"unified:{name}", stored) != self.digests[f"unified:{name}"]:
            raise ModulatorError(f"{label}: tensor '{name}' of the unified model is not the one "
                                 f"this merge wrote ({DIGEST} does not match {self.label}); "
                                 "restore the merge output or re-run the merge")

    def task_tensors(self, task: str, unified: Checkpoint, base: Checkpoint,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, weight) of task ``task``'s model, in the unified model's tensor order; every
        payload is checked against its digest before it is used."""
        t = self.task_index(task)
        self.check_models(unified, base)
        lam = self.rescalers[task]
        for name in unified.names():
            stored = unified.read(name)
            if name not in self.shapes:
                yield name, stored.clone()  # integer buffers: as in the unified model
                continue
            self.check_unified_tensor(name, stored, unified.label)
            theta0 = base.read(name).to(dtype=self.compute_dtype)
            self.check_base_tensor(name, theta0, base.label)
            mask = self.mask(t, name)
            out = assemble(theta0.to(device), stored, mask, lam).to(dtype=stored.dtype)
            if not all_finite(out):
                raise NonFiniteError(f"{self.label}: task '{task}' tensor '{name}' overflows "
                                     f"{dtype_name(stored.dtype)} (rescaler "
                                     f"{lam!r}); merge with a wider out_dtype")
            yield name, out.cpu()
