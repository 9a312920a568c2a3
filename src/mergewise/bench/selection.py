"""Validation scoring that stops as soon as a candidate can no longer be selected.

Why: scoring the validation splits dominates a benchmark run (~17 s of every ~20 s evaluation on
2 cores), and most of a row's candidates lose. Selection keeps the candidate with the largest
sum of per-task validation accuracies (first of equals), so once even a perfect score on every
example not yet seen cannot lift a candidate's sum above the best *fully scored* candidate's,
its remaining batches cannot change the outcome and are skipped. The bound is exact: the
selected candidate is the one a full evaluation of every candidate selects, whatever the order
(the runner re-scores in full any stopped candidate whose bound is not below the final best,
which only happens when cached results from another grid are reused). Stopped candidates are
reported with their bound instead of their accuracies.

Accuracies are computed exactly as ``Evaluator.score`` does (float32 count / size), so results
cached by either path compare and tie identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..task_models import TaskModels
from .evaluate import Evaluator
from .model import Head

# a candidate stops only when its bound is below the best by more than float rounding of a sum
# of float32 accuracies (distinct accuracies differ by >= 1/1000 here, far above this)
MARGIN = 1e-6


def accuracy_value(correct: int, size: int) -> float:
    """``correct / size`` rounded as float32, as ``(pred == y).float().mean()`` gives it."""
    return float(torch.tensor(float(correct), dtype=torch.float32) / size)


class UpperBound:
    """Running correct counts per task and the best sum of accuracies still reachable."""

    def __init__(self, sizes: Mapping[str, int]):
        self.sizes = dict(sizes)
        self.correct = dict.fromkeys(self.sizes, 0)
        self.seen = dict.fromkeys(self.sizes, 0)

    def add(self, task: str, correct: int, seen: int) -> None:
        self.correct[task] += correct
        self.seen[task] += seen
        if self.seen[task] > self.sizes[task]:
            raise ValueError(f"{task}: {self.seen[task]} examples scored, the split has {self.sizes[task]}")

    def upper(self) -> float:
        """Sum over tasks of (correct + unseen) / size: every unseen example counted right."""
        return sum((self.correct[t] + n - self.seen[t]) / n for t, n in self.sizes.items() if n)

    def beaten_by(self, best: float | None) -> bool:
        return best is not None and self.upper() < best - MARGIN

    def accuracies(self) -> dict[str, float]:
        return {t: accuracy_value(self.correct[t], n) for t, n in self.sizes.items()}


def bounded_accuracies(ev: Evaluator, state_dict: Mapping[str, torch.Tensor] | TaskModels,
                       heads: Mapping[str, Head], best: float | None = None) -> dict[str, Any]:
    """``{"val": {task: accuracy}}``, or ``{"stopped": True, "val_upper_bound": mean bound,
    "val_examples_scored": n}`` once no score on the rest could exceed ``best`` (a sum of
    accuracies; None: score everything). Same batches and predictions as ``ev.accuracies``."""
    bound = UpperBound(ev.sizes())
    total = sum(bound.sizes.values())  # after the last batch there is nothing left to skip
    task_specific = isinstance(state_dict, TaskModels)
    if not task_specific:
        ev.model.load_state_dict(state_dict, strict=True)
    with torch.inference_mode():
        for name in ev.tasks:
            if task_specific:
                ev.model.load_state_dict(state_dict[name], strict=True)
            prepared, start = ev.data[name], 0
            for batch in prepared.batches:
                feats = ev.encode(batch)
                rows = prepared.order[start:start + feats.shape[0]]
                start += len(rows)
                pred = heads[name](feats).argmax(-1)
                bound.add(name, int((pred == prepared.labels[rows]).sum()), len(rows))
                if bound.beaten_by(best) and sum(bound.seen.values()) < total:
                    return {"stopped": True, "val_upper_bound_sum": bound.upper(),
                            "val_upper_bound": bound.upper() / len(ev.tasks),
                            "val_examples_scored": sum(bound.seen.values())}
    return {"val": bound.accuracies()}
