"""The stats pass: per-model statistics over the whole model, gathered before the merge pass.

Methods and sparsifiers that need global information (global TIES top-k, TADrop's budget) return
a ``StatsPass`` for each model. ``run_stats_pass`` streams every tensor's task vector through
``observe`` once per declared pass and calls ``end_pass`` after each; the merge pass then hands
``for_tensor(name)`` to the sparsifier as its ``stats`` argument. Only small per-tensor results
are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .plan import TensorPlan

# (checkpoint, tensor name) -> the tensor on the compute device in the compute dtype
Reader = Callable[["Checkpoint", str], torch.Tensor]
Progress = Callable[[str, int], None]


class StatsPass:
    passes: int = 1

    def observe(self, pass_index: int, name: str, delta: torch.Tensor,
                params: dict[str, Any]) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called after every tensor was observed in ``pass_index``."""

    def for_tensor(self, name: str) -> Any:
        raise NotImplementedError


@dataclass
class Observer:
    """One model's stats pass: its checkpoint, the pass, its parameters per output tensor and,
    for a frankenmerge, the name it reads for an output tensor (default: the same name)."""

    ckpt: Checkpoint
    stats: StatsPass
    params: Callable[[TensorPlan], dict[str, Any]]
    source: Callable[[TensorPlan], str] = lambda plan: plan.name


def run_stats_pass(read: Reader, base: Checkpoint, observers: Sequence[Observer],
                   tensors: Sequence[TensorPlan], progress: Progress | None = None,
                   ahead: Callable[[TensorPlan], None] | None = None) -> None:
    """Stream the task vector (model - base) of every merged tensor through each observer, once
    per pass it declares; the base tensor is read once per tensor and pass. ``ahead(plan)`` is
    told the next tensor first, so its inputs can be read while this one is observed."""
    if not observers:
        return
    passes = max(o.stats.passes for o in observers)
    merged = [t for t in tensors if t.merged]
    for p in range(passes):
        for j, plan in enumerate(merged):
            if ahead is not None and j + 1 < len(merged):
                ahead(merged[j + 1])
            base_tensor = read(base, plan.base_name)
            for o in observers:
                if p >= o.stats.passes:
                    continue
                delta = (read.delta(o.ckpt, o.source(plan), base_tensor)  # type: ignore[attr-defined]
                         if hasattr(read, "delta") else read(o.ckpt, o.source(plan)) - base_tensor)
                o.stats.observe(p, plan.name, delta, o.params(plan))
                del delta
            if progress is not None:
                progress(plan.name, plan.numel * plan.in_dtype.itemsize * (len(observers) + 1))
        for o in observers:
            if p < o.stats.passes:
                o.stats.end_pass(p)
