"""Calibration features for data-aware merging (LOT, RegMean): layer inputs -> Gram statistics.

- ``statsfile``: the stats file format and what a merge reads (``FeatureStats``, ``load_stats``,
  ``TensorFeature``); it imports none of the other three.
- ``capture``: forward hooks and float64 accumulators (``capture``, ``capture_experts``,
  ``capture_expert``).
- ``calibration``: calibration data (seeded draw, readers, batches) and loading an expert as a
  torch module (``load_module``; transformers is optional).
- ``sources``: which model gets which stats file, and when an existing one is reused
  (``plan_sources``, ``obtain``).
- ``fisher`` and ``fisherfile``: the per-parameter diagonal Fisher (Fisher merging) and its own
  stats file kind (``fisher_capture``, ``load_fisher``; ``fisher.FISHER`` is its ``StatsKind``).
- ``packing``: short texts packed into full ``max_length`` rows (``pack: true``, causal LMs).
- ``streaming``: the capture of a few blocks at a time into one stats file
  (``blocks_per_pass``), for models whose Grams do not fit in memory at once.

Merge-time code (the engine, the LOT and RegMean methods) imports ``statsfile`` alone; the names
below are re-exported for ``from mergewise.features import ...``, each loaded with its module on
first use, so importing the package (the engine does) loads neither torch.nn nor transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calibration import (
        TENSOR_SUFFIXES,
        TEXT_SUFFIXES,
        Batch,
        calibration_batches,
        calibration_settings,
        draw_examples,
        load_factory,
        load_module,
        load_tokenizer,
        read_tensor_inputs,
        read_texts,
    )
    from .capture import PROBE_TENSORS, CaptureReport, capture, capture_expert, capture_experts
    from .sources import FeatureSource, obtain, plan_sources
    from .statsfile import FORMAT_VERSION, FeatureStats, LayerInfo, TensorFeature, load_stats, probe_hash

_HOMES = {
    **dict.fromkeys(("TENSOR_SUFFIXES", "TEXT_SUFFIXES", "Batch", "calibration_batches",
                     "calibration_settings", "draw_examples", "load_factory", "load_module",
                     "load_tokenizer", "read_tensor_inputs", "read_texts"), "calibration"),
    **dict.fromkeys(("PROBE_TENSORS", "CaptureReport", "capture", "capture_expert",
                     "capture_experts"), "capture"),
    **dict.fromkeys(("FeatureSource", "obtain", "plan_sources"), "sources"),
    **dict.fromkeys(("FORMAT_VERSION", "FeatureStats", "LayerInfo", "TensorFeature", "load_stats",
                     "probe_hash"), "statsfile"),
}
__all__ = [
    "FORMAT_VERSION", "PROBE_TENSORS", "TENSOR_SUFFIXES", "TEXT_SUFFIXES", "Batch", "CaptureReport",
    "FeatureSource", "FeatureStats", "LayerInfo", "TensorFeature", "calibration_batches",
    "calibration_settings", "capture", "capture_expert", "capture_experts", "draw_examples",
    "load_factory", "load_module", "load_stats", "load_tokenizer", "obtain", "plan_sources",
    "probe_hash", "read_tensor_inputs", "read_texts",
]


class _Package(types.ModuleType):
    """One name is both a submodule and its function (``capture``): importing the submodule sets
    the package attribute to the module; it is bound to the function instead, as the eager
    ``from .capture import capture`` did (``importlib.import_module`` still gives the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and _HOMES.get(name) == name
                and value.__name__ == f"{__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
