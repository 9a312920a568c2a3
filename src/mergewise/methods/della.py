"""DELLA-Merging (Deep et al. 2024, arXiv:2406.11617): MagPrune, then TIES sign election and
disjoint merge (mergekit's ``della``).

1. MagPrune each task vector (the ``magprune`` sparsifier): per row, keep each entry with a
   probability from density - epsilon (smallest |tau|) to density + epsilon (largest), then
   rescale the kept entries to the tensor's L1 norm. ``density`` defaults to 1.0 (no drop,
   mergekit), ``epsilon`` to 0.15.
2. Weight, elect and merge exactly as ``ties``: tau_k <- w_k tau_k, sign of the sum (0 counts
   as +), the agreeing non-zero entries divided by their models' weights (``normalize: true``,
   mergekit's default here) or summed, times ``lambda``.

A ``sparsify:`` block (e.g. TADrop) replaces the MagPrune step, as it replaces TIES's trim.

| question            | mergewise                                                  |
|---------------------|------------------------------------------------------------|
| drop                | MagPrune: per-row rank probabilities density ± epsilon (see ``magprune``) |
| rescale             | L1 norm matching (``rescale``, default true, mergekit)     |
| sign election input | weighted dropped task vectors; sum; 0 counts as +          |
| aggregation         | ``normalize`` (default true, mergekit) or ``aggregate``    |
| global scale        | ``lambda`` 1.0, after the division                         |
| int8_mask           | accepted, no effect (masks are bool; mergekit's too)       |
| RNG                 | one CPU generator per (seed, model index, tensor name)     |
| math dtype          | ``dtype`` (float32 default)                                |
| mergekit            | one global generator in tensor-name order: masks equal only in distribution   |
| mergekit            | see ``magprune``: ties, one-entry rows, the density ± epsilon check before merging |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..registry import INT8_MASK, LAMBDA, METHODS, MergeMethod, normalize_param
from .ties import AGGREGATE, ties_merge


def della_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                *, lam: float = 1.0, normalize: bool = True, aggregate: str | None = None,
                int8_mask: bool = False) -> torch.Tensor:
    return ties_merge(base, tensors, weights, lam=lam, normalize=normalize, aggregate=aggregate)


METHODS.register(MergeMethod(
    name="della",
    func=della_merge,
    space="delta",
    params=(LAMBDA, normalize_param(True), AGGREGATE, INT8_MASK),
    doc=__doc__ or "",
    elementwise=True,
    sparsifier="magprune",
))
