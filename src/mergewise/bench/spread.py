"""Spreads over expert zoos: mean ± s.d. per row, and paired evidence for every claimed gain.

Why: one zoo (one fine-tuning seed) cannot separate methods whose test averages differ by less
than a point. With zoos built from several training seeds, a gain "X over Y" is reported as
- the paired difference of test averages in each zoo (the same test examples, hyperparameters
  selected on validation in that zoo),
- how many zoos show it positive,
- a paired test-set bootstrap: the test examples of each task are resampled (seeded), the
  *same* draw for both rows and for every zoo (the zoos share one test set, so its sampling
  noise is common to them), and the mean over zoos of the difference is recomputed per draw;
  its s.d., 95 % percentile interval and the fraction of draws <= 0.

Per-example correctness travels as bit strings ("1" right, "0" wrong, in split order), the
form the result caches store.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

BOOTSTRAP = 1000


def bits(correct: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {t: "".join("1" if b else "0" for b in c.tolist()) for t, c in correct.items()}


def unbits(text: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {t: torch.tensor([c == "1" for c in s], dtype=torch.bool) for t, s in text.items()}


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample s.d. (n - 1; 0 for a single value)."""
    if not xs:
        raise ValueError("mean_sd of no values")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def average(correct: Mapping[str, torch.Tensor]) -> float:
    """Mean over tasks of the task's accuracy."""
    return sum(float(c.double().mean()) for c in correct.values()) / len(correct)


def paired_gain(a: Sequence[Mapping[str, torch.Tensor]], b: Sequence[Mapping[str, torch.Tensor]],
                reps: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Gain of row ``a`` over row ``b``; ``a[z]``/``b[z]``: zoo z's per-task correctness."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired gain needs the same zoos for both rows (got {len(a)} and {len(b)})")
    per_zoo = [average(x) - average(y) for x, y in zip(a, b, strict=True)]
    mean, sd = mean_sd(per_zoo)
    draws = bootstrap_gains(a, b, reps, seed)
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"gain": mean, "gain_sd_zoos": sd, "per_zoo": per_zoo,
            "zoos_positive": sum(g > 0 for g in per_zoo), "zoos": len(per_zoo),
            "bootstrap_sd": float(draws.std()), "bootstrap_ci95": [lo, hi],
            "bootstrap_p_le_0": float((draws <= 0).double().mean()), "bootstrap_reps": reps}


def bootstrap_gains(a: Sequence[Mapping[str, torch.Tensor]], b: Sequence[Mapping[str, torch.Tensor]],
                    reps: int = BOOTSTRAP, seed: int = 0) -> torch.Tensor:
    """``reps`` draws of the mean-over-zoos gain, each task's test examples resampled once per
    draw and shared by both rows and all zoos."""
    g = torch.Generator().manual_seed(seed)
    tasks = list(a[0])
    out = torch.zeros(reps, dtype=torch.float64)
    for t in tasks:
        sizes = {len(z[t]) for z in (*a, *b)}
        if len(sizes) != 1:
            raise ValueError(f"{t}: the rows' test results have different sizes {sorted(sizes)}")
        n = sizes.pop()
        idx = torch.randint(0, n, (reps, n), generator=g)
        for x, y in zip(a, b, strict=True):
            out += (x[t].double()[idx].mean(1) - y[t].double()[idx].mean(1)) / (len(tasks) * len(a))
    return out
