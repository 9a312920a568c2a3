"""RegMean: full-weight least squares with off-diagonal shrink, from the same statistics."""

from __future__ import annotations

import torch

from mergewise import METHODS
from mergewise.features import TensorFeature
from mergewise.methods.lot import lot_merge
from mergewise.methods.regmean import regmean_merge, shrink

D64 = torch.float64


def test_registration() -> None:
    m = METHODS.get("regmean")
    assert m.space == "weight" and m.features and not m.requires_base
    assert not m.accepts_sparsify
    assert [(p.name, p.default) for p in m.params] == [("alpha", 0.95)]


def test_shrink_keeps_the_diagonal() -> None:
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert torch.equal(shrink(g, 0.5), torch.tensor([[4.0, 1.0], [1.0, 9.0]]))
    assert shrink(g, 1.0) is g


def test_one_input_dimension_by_hand() -> None:
    # 1-wide layer: G_k = sum x^2 / n_k = 4/2 = 2 and 3/1 = 3 -> W = (2*1 + 3*6) / 5 = 4
    feats = [TensorFeature("matmul", 2.0, gram=torch.tensor([[4.0]], dtype=D64)),
             TensorFeature("matmul", 1.0, gram=torch.tensor([[3.0]], dtype=D64))]
    out = regmean_merge(None, [torch.tensor([[1.0]]), torch.tensor([[6.0]])], [1.0, 1.0],
                        features=feats)
    assert torch.equal(out, torch.tensor([[4.0]]))


def test_alpha_zero_is_a_per_input_weighted_mean() -> None:
    # alpha 0 keeps only the diagonal: column j weighted by each task's mean x_j^2
    f1 = TensorFeature("matmul", 1.0, gram=torch.tensor([[1.0, 5.0], [5.0, 3.0]], dtype=D64))
    f2 = TensorFeature("matmul", 1.0, gram=torch.tensor([[3.0, -5.0], [-5.0, 1.0]], dtype=D64))
    w1, w2 = torch.tensor([[4.0, 4.0]]), torch.tensor([[8.0, 8.0]])
    out = regmean_merge(None, [w1, w2], [1.0, 1.0], features=[f1, f2], alpha=0.0)
    # column 0: (1*4 + 3*8)/4 = 7; column 1: (3*4 + 1*8)/4 = 5
    assert torch.equal(out, torch.tensor([[7.0, 5.0]]))


def test_non_matmul_parameters_are_averaged() -> None:
    out = regmean_merge(None, [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1.0, 1.0],
                        features=[TensorFeature("shift", 9.0), TensorFeature("shift", 1.0)])
    assert torch.equal(out, torch.tensor([2.0, 4.0]))


def test_equals_lot_with_invertible_grams_and_alpha_one() -> None:
    # the paper's §2.4: alpha = 1, lambda = 1, equal row counts, invertible sum -> same weights
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g, dtype=D64)
    weights = [base + 0.1 * torch.randn(3, 4, generator=g, dtype=D64) for _ in range(2)]
    feats = []
    for _ in range(2):
        x = torch.randn(16, 4, generator=g, dtype=D64)
        feats.append(TensorFeature("matmul", 16.0, gram=x.T @ x))
    rm = regmean_merge(None, weights, [1.0, 1.0], features=feats, alpha=1.0)
    lot = lot_merge(base, [w - base for w in weights], [1.0, 1.0], features=feats)
    torch.testing.assert_close(rm, lot, rtol=1e-10, atol=1e-12)
