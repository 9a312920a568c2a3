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
below are re-exported for ``from mergewise.features import ...``.
"""

from __future__ import annotations

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

__all__ = [
    "FORMAT_VERSION", "PROBE_TENSORS", "TENSOR_SUFFIXES", "TEXT_SUFFIXES", "Batch", "CaptureReport",
    "FeatureSource", "FeatureStats", "LayerInfo", "TensorFeature", "calibration_batches",
    "calibration_settings", "capture", "capture_expert", "capture_experts", "draw_examples",
    "load_factory", "load_module", "load_stats", "load_tokenizer", "obtain", "plan_sources",
    "probe_hash", "read_tensor_inputs", "read_texts",
]
