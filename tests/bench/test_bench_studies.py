"""The studies' selection and statistics helpers (no model needed)."""

from __future__ import annotations

import pytest
import torch

from mergewise.bench import studies
from mergewise.bench.studies import (
    ArmResult,
    ablation_arms,
    compare,
    is_random,
    matched_arms,
    paired_bootstrap_sd,
    task_subsets,
    val_redraw,
)


def test_matched_arms_compare_at_the_same_target():
    for method, arms in matched_arms(0.9):
        uniform, median, elements = arms
        # DARE arms are the paper's variant (1/density rescale, disjoint mean)
        paper = {"dare_ties": {"aggregate": "mean", "rescale_rule": "density"}}.get(method, {})
        assert uniform.parameters == {**paper, "density": 0.1} and uniform.sparsify is None
        assert median.parameters == elements.parameters == {
            k: v for k, v in paper.items() if k != "rescale_rule"}
        assert median.sparsify == {"method": "tadrop", "drop_rate": 0.9}
        assert elements.sparsify == {"method": "tadrop", "drop_rate": 0.9, "budget": "elements"}
        assert all(a.method == method and a.grid[0][0] == "lambda" for a in arms)


def test_ablation_arms_sweep_strength_and_rescale():
    for _, arms in ablation_arms(0.9):
        strengths = [a.sparsify.get("strength", 1.0) for a in arms[:4]]
        assert strengths == [0.0, 0.5, 1.0, 2.0]
        assert arms[4].sparsify["rescale"] == "none"


def test_randomness_follows_the_sparsifier_and_its_mode():
    (_, ta), (_, ties), (_, dare) = matched_arms()
    assert not any(is_random(a) for a in ta + ties)
    assert all(is_random(a) for a in dare)  # DARE's trim, and TADrop under DARE defaults to random


def test_val_redraw_is_seeded_bootstrap():
    a, b, c = val_redraw({"x": 50}, 0), val_redraw({"x": 50}, 0), val_redraw({"x": 50}, 1)
    assert torch.equal(a["x"], b["x"]) and not torch.equal(a["x"], c["x"])
    assert a["x"].min() >= 0 and a["x"].max() < 50 and len(a["x"]) == 50


def test_paired_bootstrap_sd():
    x = {"t": torch.tensor([True, False] * 50)}
    assert paired_bootstrap_sd(x, x) == 0.0
    # one flipped example out of 100: the difference is 0.01 x (times it is drawn ~ Bin(100, 0.01))
    y = {"t": x["t"].clone()}
    y["t"][0] = ~y["t"][0]
    sd = paired_bootstrap_sd(x, y)
    assert sd == pytest.approx(0.01 * 0.99 ** 0.5, rel=0.15)


def _arm(avgs, bits):
    return ArmResult("a", "m", {s: {"test_average": a, "correct": {"t": torch.tensor(b)}}
                                for s, (a, b) in enumerate(zip(avgs, bits, strict=True))})


def test_compare_reports_mean_gain_and_spread():
    base = _arm([0.5, 0.5, 0.5], [[True, False]] * 3)
    better = _arm([0.6, 0.7, 0.5], [[True, True]] * 3)
    cmp = compare(better, base)
    assert cmp["gain"] == pytest.approx(0.1)
    assert cmp["gain_sd_seeds"] == pytest.approx(0.1)
    assert cmp["seeds_positive"] == 2 and cmp["seeds"] == 3


def test_task_subsets_are_seeded_and_sorted():
    tasks = list("abcdef")
    subs = task_subsets(tasks, 2)
    assert subs == task_subsets(tasks, 2) and len(subs) == len(studies.TASK_SUBSET_SEEDS)
    assert all(len(s) == 2 and s == sorted(s, key=tasks.index) for s in subs)
    assert task_subsets(tasks, 6) == [tasks]
