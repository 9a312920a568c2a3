"""Statistics over expert zoos on hand-made numbers (no model needed)."""

from __future__ import annotations

import pytest
import torch

import mergewise  # noqa: F401  (fills the registries)
from mergewise.bench.spread import bits, bootstrap_gains, mean_sd, paired_gain, unbits
from mergewise.bench.zoos import claims, combine, markdown


def _c(*xs):
    return torch.tensor(xs, dtype=torch.bool)


def test_mean_sd_and_bits_round_trip():
    assert mean_sd([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    assert mean_sd([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError):
        mean_sd([])
    c = {"t": _c(1, 0, 1, 1)}
    assert bits(c) == {"t": "1011"} and torch.equal(unbits(bits(c))["t"], c["t"])


def test_paired_gain_per_zoo_counts_and_a_certain_gain():
    # task t, 4 test examples; zoo gains: +0.5, +0.25, -0.25
    a = [{"t": _c(1, 1, 1, 0)}, {"t": _c(1, 1, 0, 0)}, {"t": _c(0, 0, 0, 1)}]
    b = [{"t": _c(1, 0, 0, 0)}, {"t": _c(1, 0, 0, 0)}, {"t": _c(0, 0, 1, 1)}]
    g = paired_gain(a, b, reps=200, seed=3)
    assert g["per_zoo"] == pytest.approx([0.5, 0.25, -0.25])
    assert g["gain"] == pytest.approx(1 / 6) and g["gain_sd_zoos"] == pytest.approx(0.3818813079)
    assert g["zoos_positive"] == 2 and g["zoos"] == 3
    assert g["bootstrap_reps"] == 200 and g["bootstrap_ci95"][0] <= g["gain"] + 0.3
    # a row right everywhere the other is wrong: every resample has gain exactly 1
    sure = paired_gain([{"t": _c(1, 1, 1)}] * 2, [{"t": _c(0, 0, 0)}] * 2, reps=50)
    assert sure["bootstrap_sd"] == 0.0 and sure["bootstrap_ci95"] == [1.0, 1.0]
    assert sure["bootstrap_p_le_0"] == 0.0 and sure["zoos_positive"] == 2
    same = paired_gain(a, a, reps=50)
    assert same["gain"] == 0.0 and same["bootstrap_p_le_0"] == 1.0 and same["zoos_positive"] == 0


def test_bootstrap_is_seeded_shares_one_draw_and_checks_sizes():
    a = [{"t": _c(1, 0, 1, 0, 1)}, {"t": _c(1, 1, 0, 0, 1)}]
    b = [{"t": _c(0, 0, 1, 0, 0)}, {"t": _c(1, 0, 0, 0, 0)}]
    assert torch.equal(bootstrap_gains(a, b, 30, seed=1), bootstrap_gains(a, b, 30, seed=1))
    assert not torch.equal(bootstrap_gains(a, b, 30, seed=1), bootstrap_gains(a, b, 30, seed=2))
    # one flipped example out of 100 in one zoo of one: s.d. ~ 0.01 * sqrt(0.99)
    x = {"t": torch.tensor([True, False] * 50)}
    y = {"t": x["t"].clone()}
    y["t"][0] = ~y["t"][0]
    assert float(bootstrap_gains([x], [y], 2000).std()) == pytest.approx(0.01 * 0.99 ** 0.5, rel=0.15)
    with pytest.raises(ValueError, match="different sizes"):
        bootstrap_gains([{"t": _c(1, 0)}], [{"t": _c(1)}], 5)
    with pytest.raises(ValueError, match="same zoos"):
        paired_gain(a, b[:1])


def _row(label, kind, method, avg, val, test_bits=None):
    r = {"label": label, "kind": kind, "method": method, "average": avg, "normalized": avg / 0.8,
         "test": {"t": avg}, "val_average": val, "selected": {"parameters": {}, "sparsify": None}}
    return {**r, "test_bits": {"t": test_bits}} if test_bits else r


def _doc(shift):
    rows = [_row("experts (each on its own task)", "experts", None, 0.8, None),
            _row("ties", "merge", "ties", 0.5, 0.6 + shift, "1100"),
            _row("ties+tadrop", "tadrop", "ties", 0.75, 0.5, "1110"),
            _row("task_arithmetic", "merge", "task_arithmetic", 0.25, 0.55, "1000"),
            _row("lot", "merge", "lot", 0.75, 0.9, "1011")]
    return {"tasks": ["t"], "test_sizes": {"t": 4}, "rows": rows, "seconds": 10.0}


def test_combine_spreads_and_claims():
    docs = [_doc(0.0), _doc(-0.1)]  # zoo 2: TIES's val 0.5 < TA's 0.55; summed 1.1 vs 1.1 ...
    docs[1]["rows"][1]["val_average"] = 0.52  # ... now 1.12 > 1.10: TIES is the best data-free row
    assert claims(docs) == [("ties+tadrop", "ties"), ("lot", "ties")]
    doc = combine(docs, [0, 1])
    ties = next(r for r in doc["rows"] if r["label"] == "ties")
    assert ties["average"] == 0.5 and ties["average_sd"] == 0.0 and ties["test"]["t"] == (0.5, 0.0)
    g = {x["row"]: x for x in doc["gains"]}
    assert g["ties+tadrop"]["per_zoo"] == pytest.approx([0.25, 0.25])
    assert g["lot"]["baseline"] == "ties" and g["lot"]["zoos_positive"] == 2
    md = markdown(doc)
    assert "| ties | 50.0 ± 0.0 |" in md and "| ties+tadrop vs ties | +25.00 ± 0.00 |" in md
    bad = _doc(0.0)
    bad["rows"] = bad["rows"][:2]
    with pytest.raises(ValueError, match="different rows"):
        combine([_doc(0.0), bad], [0, 1])
