"""Exact quantiles and the quantile ratio d, checked against numpy on many shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise.selection import keep_count_from_drop, keep_fraction_from_drop, quantile_ratio, quantiles

LEVELS = [0.0, 0.05, 0.5, 0.9, 0.95, 1.0]


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 5), (4, 4, 4), (1001,), (64, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_quantiles_match_numpy(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    ref = np.quantile(x.to(torch.float64).numpy().reshape(-1), LEVELS)
    np.testing.assert_allclose(quantiles(x, LEVELS), ref, rtol=1e-6, atol=1e-7)


def test_quantiles_all_zero_and_mostly_zero():
    assert quantiles(torch.zeros(10), [0.5, 0.95]) == [0.0, 0.0]
    x = torch.zeros(1000)
    x[:50] = torch.arange(1, 51, dtype=torch.float32)  # 95% zeros
    ref = np.quantile(x.numpy(), [0.5, 0.95, 0.96, 0.99])
    np.testing.assert_allclose(quantiles(x, [0.5, 0.95, 0.96, 0.99]), ref)
    assert quantile_ratio(torch.zeros(5)) is None
    assert quantile_ratio(x) == 0.0


def test_quantiles_hand_values():
    x = torch.tensor([4.0, 1.0, 3.0, 2.0])  # sorted 1 2 3 4; rank q*3
    assert quantiles(x, [0.5]) == [2.5]            # rank 1.5
    assert quantiles(x, [0.95]) == pytest.approx([3.85])  # rank 2.85 -> 3 + 0.85
    assert quantiles(torch.tensor([7.0]), [0.0, 0.5, 1.0]) == [7.0, 7.0, 7.0]


def test_quantiles_beyond_torch_quantile_limit():
    n = 2**24 + 1001  # torch.quantile refuses above 2**24 elements
    x = torch.rand(n, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    got = quantiles(x, [0.5, 0.95])
    ref = np.quantile(x.numpy(), [0.5, 0.95])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)


def test_reference_ratios_of_known_distributions():
    g = torch.Generator().manual_seed(1)
    n = 2_000_000
    gauss = quantile_ratio(torch.randn(n, generator=g))
    uniform = quantile_ratio(torch.rand(n, generator=g) * 2 - 1)
    u = torch.rand(n, generator=g)
    laplace = quantile_ratio(torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs()))
    assert gauss == pytest.approx(0.344, abs=0.003)
    assert uniform == pytest.approx(0.526, abs=0.003)
    assert laplace == pytest.approx(0.231, abs=0.003)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32),
                       min_size=2, max_size=80),
       exponent=st.integers(-8, 8), flips=st.integers(0, 2**32 - 1))
def test_ratio_invariant_to_scale_and_sign(values, exponent, flips):
    x = torch.tensor(values, dtype=torch.float32)
    signs = torch.tensor([(-1.0) ** ((flips >> (i % 32)) & 1) for i in range(len(values))])
    base = quantile_ratio(x)
    scaled = quantile_ratio(x * signs * (2.0 ** exponent))  # powers of 2 scale exactly
    assert base == scaled
    other = quantile_ratio(x * 3.7)
    if base is None:
        assert other is None
    else:
        assert other == pytest.approx(base, rel=1e-5, abs=1e-7)


def test_drop_rate_to_keep_count_is_exact():
    assert keep_count_from_drop(0.8, 10) == 2
    assert keep_count_from_drop(0.65, 10) == 4  # 3.5 rounds half up
    assert keep_count_from_drop(0.9999, 10) == 1  # at least one
    assert keep_count_from_drop(1.0, 10) == 0
    assert keep_fraction_from_drop(0.8) == 0.2


def _partitioned(x: torch.Tensor, levels: list[float]) -> list[float]:
    """The quantiles from one ``np.partition`` of the whole array (the plain path)."""
    v = x.reshape(-1).float().numpy()
    n = v.size
    ranks = [(int(q * (n - 1)), q * (n - 1) - int(q * (n - 1))) for q in levels]
    needed = sorted({k for lo, f in ranks for k in ((lo, lo + 1) if f > 0 else (lo,))})
    part = np.partition(v, needed)
    return [float(part[lo]) + f * (float(part[lo + 1]) - float(part[lo])) if f > 0
            else float(part[lo]) for lo, f in ranks]


def _large(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).pow(3).abs()
    if kind == "bf16":  # a few thousand distinct magnitudes: ties at every quantile
        return (x * 1e-3).bfloat16().float()
    if kind == "zeros":  # an embedding's task vector: 93% exact zeros
        return x * (torch.rand(n, generator=g) < 0.07)
    if kind == "few":
        return torch.randint(0, 3, (n,), generator=g).float()
    if kind == "inf":
        x[torch.randint(0, n, (50,), generator=g)] = float("inf")
    if kind == "nan":  # partition orders NaN last; a rank among them takes the plain path
        x[torch.rand(n, generator=g) < 0.1] = float("nan")
    return x


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["normal", "bf16", "zeros", "few", "inf", "nan"]),
       extra=st.integers(0, 5000), seed=st.integers(0, 10**6),
       levels=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3))
def test_bracketed_quantiles_equal_one_partition(kind, extra, seed, levels):
    x = _large(kind, (1 << 18) + extra, seed)
    got, want = quantiles(x, levels), _partitioned(x, levels)
    assert np.array_equal(np.array(got), np.array(want), equal_nan=True)


def test_bracketed_quantiles_at_the_ends_and_ratio():
    x = _large("bf16", 3 << 18, 1)
    levels = [0.0, 0.5, 0.95, 1.0]
    assert quantiles(x, levels) == _partitioned(x, levels)
    q = _partitioned(x, [0.5, 0.95])
    assert quantile_ratio(x) == q[0] / q[1]
