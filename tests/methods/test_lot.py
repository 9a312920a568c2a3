"""LOT Merging: the closed forms' analytic properties on random matrices and hand-made numbers."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, FeatureError
from mergewise.features import TensorFeature
from mergewise.methods.lot import lot_delta, lot_merge

D64 = torch.float64


def gram(x: torch.Tensor) -> TensorFeature:
    return TensorFeature("matmul", float(x.shape[0]), gram=x.T @ x)


def test_registration() -> None:
    m = METHODS.get("lot")
    assert m.space == "delta" and m.features and m.requires_base
    assert m.accepts_sparsify and m.sparsifier is None
    assert [p.name for p in m.params] == ["lambda", "rtol", "fallback", "tasks"]
    assert m.model_params == ()


def test_equal_grams_give_the_mean() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=D64)
    taus = [torch.randn(5, 6, generator=g, dtype=D64) for _ in range(3)]
    out = lot_delta(taus, [gram(x)] * 3)
    torch.testing.assert_close(out, sum(taus) / 3, rtol=1e-10, atol=1e-12)


def test_orthogonal_row_spaces_reproduce_each_expert() -> None:
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=D64))
    # expert k's inputs live in the span of 3 orthonormal directions of its own
    xs = [torch.randn(20, 3, generator=g, dtype=D64) @ basis[:, 3 * k:3 * k + 3].T
          for k in range(3)]
    taus = [torch.randn(4, 9, generator=g, dtype=D64) for _ in range(3)]
    merged = lot_delta(taus, [gram(x) for x in xs])
    for x, tau in zip(xs, taus, strict=True):
        torch.testing.assert_close(x @ merged.T, x @ tau.T, rtol=1e-9, atol=1e-10)


def test_single_expert_gives_the_projection_onto_its_row_space() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, generator=g, dtype=D64)  # rank 3 < 7: a real null space
    tau = torch.randn(5, 7, generator=g, dtype=D64)
    q, _ = torch.linalg.qr(x.T)  # orthonormal basis of the row space
    out = lot_delta([tau], [gram(x)])
    torch.testing.assert_close(out, tau @ q @ q.T, rtol=1e-9, atol=1e-10)
    # the null-space component is left at the base: merged + base keeps theta0 there
    null = torch.linalg.svd(x).Vh[3:]
    torch.testing.assert_close(out @ null.T, torch.zeros(5, 4, dtype=D64), rtol=0, atol=1e-10)


def test_norm_scale_is_energy_weighted() -> None:
    # energies s1 = [1, 3, 0], s2 = [3, 1, 0]; dim 0: (1*2 + 3*6)/4 = 5; dim 1: (3*2 + 1*6)/4 = 3
    # dim 2 has no energy at all: the mean (0 + 4)/2 = 2
    t1, t2 = torch.tensor([2.0, 2.0, 0.0]), torch.tensor([6.0, 6.0, 4.0])
    f1 = TensorFeature("scale", 5.0, energy=torch.tensor([1.0, 3.0, 0.0], dtype=D64))
    f2 = TensorFeature("scale", 5.0, energy=torch.tensor([3.0, 1.0, 0.0], dtype=D64))
    assert torch.equal(lot_delta([t1, t2], [f1, f2]), torch.tensor([5.0, 3.0, 2.0]))


def test_bias_is_row_weighted() -> None:
    # rows 1 and 3: (1*[4, 0] + 3*[0, 8]) / 4 = [1, 6]
    out = lot_delta([torch.tensor([4.0, 0.0]), torch.tensor([0.0, 8.0])],
                    [TensorFeature("shift", 1.0), TensorFeature("shift", 3.0)])
    assert torch.equal(out, torch.tensor([1.0, 6.0]))


def test_expert_without_statistics_contributes_nothing() -> None:
    out = lot_delta([torch.tensor([4.0]), torch.tensor([100.0])],
                    [TensorFeature("shift", 2.0), None])
    assert torch.equal(out, torch.tensor([4.0]))


def test_fallback_rule_and_lambda() -> None:
    base = torch.tensor([1.0, 1.0])
    taus = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])]
    # no statistics (an embedding): mean [1, 2]; lambda 0.5 -> base + [0.5, 1]
    out = lot_merge(base, taus, [1.0, 1.0], features=[None, None], lam=0.5)
    assert torch.equal(out, torch.tensor([1.5, 2.0]))
    kept = lot_merge(base, taus, [1.0, 1.0], features=[None, None], fallback="base")
    assert torch.equal(kept, base)


def test_conv_kernel_and_in_out_layouts() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 12, generator=g, dtype=D64)
    f = gram(x)
    kernels = [torch.randn(4, 3, 2, 2, generator=g, dtype=D64) for _ in range(2)]
    out = lot_delta(kernels, [f, f])  # equal Grams: the mean, in the kernel's own shape
    torch.testing.assert_close(out, (kernels[0] + kernels[1]) / 2)
    transposed = TensorFeature("matmul", 30.0, gram=f.gram, in_out=True)
    flat = [k.reshape(4, 12) for k in kernels]
    x2 = torch.randn(30, 12, generator=g, dtype=D64)
    other = TensorFeature("matmul", 30.0, gram=x2.T @ x2, in_out=True)
    want = lot_delta(flat, [TensorFeature("matmul", 30.0, gram=f.gram), gram(x2)])
    got = lot_delta([t.T for t in flat], [transposed, other])
    torch.testing.assert_close(got, want.T)


def test_rtol_cuts_weak_directions() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1e-4]], dtype=D64)  # energies 1 and 1e-8
    tau = torch.tensor([[2.0, 3.0]], dtype=D64)
    assert torch.equal(lot_delta([tau], [gram(x)], rtol=1e-6), torch.tensor([[2.0, 0.0]], dtype=D64))
    torch.testing.assert_close(lot_delta([tau], [gram(x)], rtol=1e-12), tau)


def test_mixed_kinds_are_an_error() -> None:
    with pytest.raises(FeatureError, match="disagree"):
        lot_delta([torch.ones(2), torch.ones(2)],
                  [TensorFeature("shift", 1.0), TensorFeature("scale", 1.0, energy=torch.ones(2))],
                  name="x.bias")


def test_float32_inputs_stay_float32() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, generator=g)
    taus = [torch.randn(2, 3, generator=g) for _ in range(2)]
    feats = [TensorFeature("matmul", 10.0, gram=(x.T @ x).double())] * 2
    out = lot_merge(torch.zeros(2, 3), taus, [1.0, 1.0], features=feats)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (taus[0] + taus[1]) / 2)


def test_tasks_equal_divides_each_task_by_its_rows() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 4, generator=g, dtype=D64)
    t1, t2 = (torch.randn(3, 4, generator=g, dtype=D64) for _ in range(2))
    f1 = TensorFeature("matmul", 1.0, gram=x.T @ x)
    f2 = TensorFeature("matmul", 3.0, gram=3 * (x.T @ x))  # 3x the rows, same distribution
    torch.testing.assert_close(lot_delta([t1, t2], [f1, f2]), (t1 + 3 * t2) / 4)
    torch.testing.assert_close(lot_delta([t1, t2], [f1, f2], tasks="equal"), (t1 + t2) / 2)
    b1, b2 = torch.tensor([4.0]), torch.tensor([0.0])
    shifts = [TensorFeature("shift", 1.0), TensorFeature("shift", 3.0)]
    assert torch.equal(lot_delta([b1, b2], shifts), torch.tensor([1.0]))
    assert torch.equal(lot_delta([b1, b2], shifts, tasks="equal"), torch.tensor([2.0]))
