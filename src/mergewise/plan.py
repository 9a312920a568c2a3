"""The plan: which tensors a merge reads and writes, checked before any tensor data is read.

Every checkpoint is compared with the reference (the base, or the first model when the method
needs no base) by its headers alone: names, shapes, float-vs-integer dtypes and the config's
architecture; every mismatch is reported at once. Floating-point tensors are merged; integer and
bool buffers (``position_ids``...) are copied from the reference and may be absent from experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .errors import CheckpointError, ShapeMismatchError
from .layers import before_blocks, layer_count, layer_index, position, with_layer
from .tensors import TensorInfo, code_of, itemsize, torch_dtype

if TYPE_CHECKING:
    import torch

MAX_LISTED = 8


@dataclass(frozen=True)
class Sources:
    """Where an output tensor is read from, by name: the reference, the base, each model."""

    reference: str
    base: str | None
    models: tuple[str, ...]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output: its header (the reference's, under the output name), the dtype
    it is written in (``out_code``, a safetensors code: planning imports no torch), and whether
    it is merged (floating point) or copied from the reference.
    ``sources`` are the names read from the reference, the base and each model when they are
    not the output name (a frankenmerge reads block 5 into output block 8)."""

    info: TensorInfo
    out_code: str
    merged: bool
    t: float = 0.0  # the tensor's layer position in [0, 1] (parameter gradients)
    sources: Sources | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def ref_name(self) -> str:
        return self.sources.reference if self.sources else self.name

    @property
    def base_name(self) -> str:
        return self.sources.base if self.sources and self.sources.base else self.name

    def input_names(self) -> list[str] | None:
        """The name read from each model (None: the output name for every model)."""
        return list(self.sources.models) if self.sources else None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def in_dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return torch_dtype(self.out_code)

    @property
    def numel(self) -> int:
        return self.info.numel

    @property
    def out(self) -> TensorInfo:
        """What the writer is told about this tensor."""
        return TensorInfo(self.name, self.shape, self.out_code)


def check_configs(ckpts: Sequence[Checkpoint]) -> None:
    """Refuse quantized checkpoints and a mix of architectures (from ``config.json``, whose
    field types ``Checkpoint.config`` has checked). Architectures are compared where two
    configs both name them, model types where two both give one: a config that lacks one (null
    or absent) is not a mismatch, and any differing pair is caught, as each is compared with the
    first value seen."""
    first: dict[str, tuple[str, str]] = {}  # field -> (value, label of its first checkpoint)
    for ckpt in ckpts:
        cfg = ckpt.config
        if cfg is None:
            continue
        quant = cfg.get("quantization_config")
        if quant:
            raise CheckpointError(f"{ckpt.label}: is a quantized checkpoint "
                                  f"({quant.get('quant_method', '?')}); "
                                  "dequantize it to float16/bfloat16 first")
        fields = {"architectures": ",".join(cfg.get("architectures") or []),
                  "model_type": cfg.get("model_type") or ""}
        for field, value in fields.items():
            if not value:
                continue
            seen = first.setdefault(field, (value, ckpt.label))
            if value != seen[0]:
                raise ShapeMismatchError(f"mixed architectures: {seen[1]} is {seen[0]} but "
                                         f"{ckpt.label} is {value}; merge models of one base only")


def _mismatches(reference: Checkpoint, ref_infos: dict[str, TensorInfo],
                ckpt: Checkpoint, rowless: set[str]) -> list[str]:
    problems = []
    names = set(ckpt.names())
    for name, info in ref_infos.items():
        if name not in names:
            if info.is_float:
                problems.append(f"{ckpt.label}: missing tensor '{name}'")
            continue
        other = ckpt.info(name)
        compared = (other.shape[1:], info.shape[1:]) if name in rowless else (other.shape,
                                                                            info.shape)
        if compared[0] != compared[1]:
            problems.append(f"{ckpt.label}: tensor '{name}' has shape {list(other.shape)}, "
                            f"{reference.label} has {list(info.shape)}")
        elif other.is_float != info.is_float:
            problems.append(f"{ckpt.label}: tensor '{name}' is {other.dtype}, "
                            f"{reference.label} has {info.dtype}")
    for name in names - set(ref_infos):
        if ckpt.info(name).is_float:
            problems.append(f"{ckpt.label}: extra tensor '{name}' not in {reference.label}")
    return problems


def plan_tensors(reference: Checkpoint, others: Sequence[Checkpoint],
                 out_dtype: torch.dtype | str | None = None,
                 vocab: tuple[set[str], int] | None = None) -> list[TensorPlan]:
    """The output's tensors in the reference's order; every mismatch of ``others`` reported at
    once. ``out_dtype`` overrides the reference's dtype of merged tensors. ``vocab``: the
    vocabulary tensors (rows aligned by token, so their row counts may differ) and the output's
    row count."""
    check_configs([reference, *others])
    ref_infos = {n: reference.info(n) for n in reference.names()}
    rowless, rows = vocab if vocab is not None else (set(), 0)
    problems = [p for ckpt in others if ckpt is not reference
                for p in _mismatches(reference, ref_infos, ckpt, rowless)]
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ShapeMismatchError(
            f"{len(problems)} mismatch(es) between the models and the base: {shown}{more} "
            "(all models must share the base's architecture)")
    count = layer_count(reference.config, ref_infos)
    plans = [TensorPlan(info if info.name not in rowless
                        else TensorInfo(info.name, (rows, *info.shape[1:]), info.code),
                        _written(info, out_dtype), info.is_float,
                        position(layer_index(info.name), count))
             for info in ref_infos.values()]
    if not any(p.merged for p in plans):
        raise CheckpointError(f"{reference.label}: no floating-point tensors to merge")
    return plans


@dataclass
class PlanSummary:
    tensors: int
    merged: int
    copied: int
    parameters: int
    bytes_read: int
    bytes_written: int
    largest_tensor: str
    peak_bytes_estimate: int
    stats_passes: int

    def lines(self) -> list[str]:
        gb = 1e9
        return [
            f"tensors: {self.tensors} ({self.merged} merged, {self.copied} copied from the base)",
            f"parameters: {self.parameters:,}",
            f"read: {self.bytes_read / gb:.3f} GB, write: {self.bytes_written / gb:.3f} GB",
            f"largest tensor: {self.largest_tensor}",
            f"estimated peak working memory: {self.peak_bytes_estimate / gb:.3f} GB "
            "(K+4 copies of the largest tensor in the compute dtype)",
            f"passes over the inputs: {1 + self.stats_passes} "
            f"({self.stats_passes} stats pass(es) + merge)",
        ]


def _written(info: TensorInfo, out_dtype: torch.dtype | str | None) -> str:
    """The code a tensor is written in: ``out_dtype`` for a merged (floating-point) tensor when
    the recipe names one, else the reference's own."""
    return code_of(out_dtype) if out_dtype is not None and info.is_float else info.code


def summarize(tensors: Sequence[TensorPlan], n_models: int, n_inputs: int,
              compute_dtype: torch.dtype | str, stats_passes: int) -> PlanSummary:
    """Sizes of a plan: ``n_inputs`` checkpoints are read (K models, plus the base when the
    method works on task vectors); peak memory is K + 4 copies of the largest tensor."""
    merged = [t for t in tensors if t.merged]
    largest = max(merged, key=lambda t: t.numel)
    return PlanSummary(
        tensors=len(tensors), merged=len(merged), copied=len(tensors) - len(merged),
        parameters=sum(t.numel for t in tensors),
        bytes_read=sum(t.info.nbytes for t in tensors) * n_inputs,
        bytes_written=sum(t.numel * itemsize(t.out_code) for t in tensors),
        largest_tensor=f"{largest.name} {list(largest.shape)}",
        peak_bytes_estimate=largest.numel * itemsize(compute_dtype) * (n_models + 4),
        stats_passes=stats_passes,
    )


def _slice_names(reference: Checkpoint, layer: int) -> list[str]:
    return [n for n in reference.names() if layer_index(n) == layer]


def plan_slice(reference: Checkpoint, ref_range: tuple[int, int], models: Sequence[Checkpoint],
               ranges: Sequence[tuple[int, int]], base: Checkpoint | None,
               base_range: tuple[int, int] | None, out_start: int, *, first: bool, last: bool,
               out_dtype: torch.dtype | str | None = None, where: str = "slice") -> list[TensorPlan]:
    """The output tensors of one slice of a ``slices:`` recipe: the reference's blocks
    ``ref_range`` renumbered from ``out_start``, each read from block ``a + offset`` of every
    model (and of the base); the embeddings when ``first``, the final norm and head when
    ``last``. Every input is checked to hold each tensor it is asked for, with its shape."""
    length = ref_range[1] - ref_range[0]
    rows: list[tuple[str, Sources, float]] = []
    if first:
        rows += [(n, Sources(n, n if base else None, tuple(n for _ in models)), 0.0)
                 for n in reference.names() if before_blocks(n)]
    for off in range(length):
        names = _slice_names(reference, ref_range[0] + off)
        if not names:
            raise ShapeMismatchError(f"{where}: {reference.label} has no layer "
                                     f"{ref_range[0] + off} (layer_range {list(ref_range)})")
        for n in names:
            src = Sources(n, with_layer(n, base_range[0] + off) if base_range else None,
                          tuple(with_layer(n, r[0] + off) for r in ranges))
            rows.append((with_layer(n, out_start + off), src, position(off, length)))
    if last:
        rows += [(n, Sources(n, n if base else None, tuple(n for _ in models)), 0.0)
                 for n in reference.names() if layer_index(n) is None and not before_blocks(n)]
    problems = [p for _, src, _ in rows for p in _source_problems(reference, src, models, base)]
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ShapeMismatchError(f"{where}: {len(problems)} mismatch(es): {shown}{more}")
    plans = []
    for out_name, src, t in rows:
        info = reference.info(src.reference)
        plans.append(TensorPlan(TensorInfo(out_name, info.shape, info.code),
                                _written(info, out_dtype), info.is_float, t, src))
    return plans


def _source_problems(reference: Checkpoint, src: Sources, models: Sequence[Checkpoint],
                     base: Checkpoint | None) -> list[str]:
    info = reference.info(src.reference)
    pairs = [*zip(models, src.models, strict=True), *([(base, src.base)] if base else [])]
    out = []
    for ckpt, name in pairs:
        if ckpt is reference and name == src.reference:
            continue
        if name not in ckpt.names():
            if info.is_float:
                out.append(f"{ckpt.label}: missing tensor '{name}'")
        elif ckpt.info(name).shape != info.shape:
            out.append(f"{ckpt.label}: tensor '{name}' has shape {list(ckpt.info(name).shape)}, "
                       f"{reference.label}'s '{src.reference}' has {list(info.shape)}")
    return out
