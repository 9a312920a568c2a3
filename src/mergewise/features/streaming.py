"""Streaming capture: a few blocks' Grams in memory at a time, written into one stats file.

``capture`` holds every layer's sums until the end: for a 7B Llama that is 43.9 GB of float64
(shared Grams) per expert. ``capture_to_file`` instead runs one pass over the calibration
batches per group of ``blocks_per_pass`` blocks (``sequential.block_names``: ``model.layers.N``
...), hooking that group's layers only, and stops each forward pass where the next group would
start (the layers after it are not needed). Each pass's statistics go to a shard file and are
dropped; the shards are then joined, byte for byte, into one stats file (written atomically).
The layers outside the blocks (stem, final norm, head) are captured in the last pass, which
runs the whole model. A block's inputs do not depend on whether later blocks run, so the file
holds exactly the accumulators of one-pass ``capture`` + ``save``.

Cost: pass g runs blocks 0 .. end of group g, so G groups of s blocks cost ≈ (G + 1)/2 forward
passes (s = 4 on 32 blocks: 4.5); peak memory is one group's Grams plus one batch's activations.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from torch import nn

from ..errors import FeatureError
from ..writer import atomic_file
from .calibration import Batch
from .capture import CaptureReport, capture, prepare_expert, probe_metadata
from .sequential import block_names
from .statsfile import LayerInfo, file_metadata

COPY_CHUNK = 64 << 20


def pass_plan(module: nn.Module, blocks_per_pass: int
              ) -> list[tuple[Callable[[str], bool], nn.Module | None]]:
    """(which layers to hook, where to stop) per pass: groups of ``blocks_per_pass`` blocks, the
    layers outside every block with the last group. A model without blocks is one pass."""
    if blocks_per_pass < 1:
        raise FeatureError(f"blocks_per_pass is {blocks_per_pass}; it must be at least 1")
    blocks = block_names(module)
    groups = [blocks[i:i + blocks_per_pass] for i in range(0, len(blocks), blocks_per_pass)]
    if not groups:
        return [(lambda _: True, None)]

    def inside(names: Sequence[str]) -> Callable[[str], bool]:
        return lambda n: any(n == b or n.startswith(b + ".") for b in names)

    out: list[tuple[Callable[[str], bool], nn.Module | None]] = []
    for g, group in enumerate(groups):
        if g + 1 < len(groups):
            out.append((inside(group), module.get_submodule(groups[g + 1][0])))
        else:
            inner, anywhere = inside(group), inside(blocks)
            out.append((lambda n, i=inner, a=anywhere: i(n) or not a(n), None))  # type: ignore[misc]
    return out


def capture_to_file(module: nn.Module, batches: Sequence[Batch], path: Path, *,
                    blocks_per_pass: int, label: str = "model",
                    calibration: Mapping[str, object] | None = None,
                    probe_from: Iterable[str] | None = None, accumulate: str = "float64",
                    share_grams: bool = True) -> tuple[Path, int, int, int]:
    """``capture(...).save(path)`` with a few blocks' Grams in memory at a time (above).
    Returns (path, examples, rows, layers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    layers: dict[str, LayerInfo] = {}
    shared: dict[str, str] = {}
    rows, examples, shards = 0, 0, []
    try:
        for i, (include, stop) in enumerate(pass_plan(module, blocks_per_pass)):
            stats = capture(module, batches, label=label, include=include, stop_before=stop,
                            accumulate=accumulate, share_grams=share_grams)
            shards.append(stats.save(scratch / f"{i}.safetensors"))
            layers.update(stats.layers)
            shared.update(stats.shared)
            rows, examples = max(rows, stats.total_rows), int(stats.metadata["examples"])
            extra = {k: v for k, v in stats.metadata.items() if k == "accumulate"}
            del stats  # this group's Grams leave memory before the next pass
        layers = {n: layers[n] for n, _ in module.named_modules() if n in layers}  # in order
        metadata = {"model": label, "examples": str(examples), "rows": str(rows),
                    "calibration": json.dumps(dict(calibration or {}), sort_keys=True),
                    **probe_metadata(module, layers, probe_from), **extra}
        join_shards(shards, path, file_metadata(metadata, layers, shared))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path, examples, rows, len(layers)


def _header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """(where the data starts, the tensor entries) of a safetensors file written here."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def join_shards(shards: Sequence[Path], path: Path, metadata: Mapping[str, str]) -> None:
    """One safetensors file of every tensor of ``shards`` (names distinct), data copied in
    chunks (never a whole shard in memory), written atomically."""
    entries = []
    for shard in shards:
        start, header = _header(shard)
        entries += [(name, info, shard, start) for name, info in header.items()]
    out: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, info, _, _ in entries:
        begin, end = info["data_offsets"]  # type: ignore[misc]
        out[name] = {"dtype": info["dtype"], "shape": info["shape"],
                     "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as dst:
        dst.write(len(text).to_bytes(8, "little") + text)
        for _, info, shard, start in entries:
            begin, end = info["data_offsets"]  # type: ignore[misc]
            with open(shard, "rb") as src:
                src.seek(start + begin)
                left = end - begin
                while left > 0:
                    chunk = src.read(min(COPY_CHUNK, left))
                    dst.write(chunk)
                    left -= len(chunk)


def stream_expert(model_path: Path, data_path: Path, target: Path, *, blocks_per_pass: int,
                  task: str = "", **kw: object) -> CaptureReport:
    """``capture_expert`` streamed into ``target`` (``capture_to_file``); ``kw`` as
    ``capture_expert``'s (num_examples, batch_size, max_length, seed, text_field, pack,
    accumulate, tokenizer_paths, factory, root, device)."""
    accumulate = str(kw.get("accumulate", "float64"))
    module, batches, settings, held = prepare_expert(model_path, data_path, **kw)  # type: ignore[arg-type]
    start = time.perf_counter()
    path, examples, rows, layers = capture_to_file(
        module, batches, target, blocks_per_pass=blocks_per_pass, label=str(model_path),
        calibration=settings, probe_from=held, accumulate=accumulate)
    return CaptureReport(task or str(model_path), examples, rows, layers,
                         time.perf_counter() - start, path)
