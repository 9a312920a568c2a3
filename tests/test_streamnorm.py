"""``StreamedNorm`` gives ``Float64Norm``'s bits on tensors fed chunk by chunk: any length (the
SIMD tail), any chunking at multiples of the group, masses of zeros (the groups it drops), bf16 /
fp16 / float32 values, a wide dynamic range (where the summation order shows), all zeros."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise.numerics import Float64Norm
from mergewise.streamnorm import GROUPS, StreamedNorm, exact_group, float64_norm


def _streamed(x: torch.Tensor, chunk: int, group: int | None = None) -> float:
    norm = StreamedNorm(x.numel(), x.dtype, group)
    for start in range(0, x.numel(), chunk):
        norm.add(slice(start, min(x.numel(), start + chunk)), x[start:start + chunk])
    return norm.value()


def _values(n: int, seed: int, density: float, spread: float, dtype: torch.dtype
            ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).abs() * (torch.rand(n, generator=g) < density)
    x *= torch.exp(torch.randn(n, generator=g) * spread)
    return x.to(dtype)


def test_the_group_is_checked_on_this_machine() -> None:
    assert exact_group() in (1, *GROUPS)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 20000), seed=st.integers(0, 10**6),
       density=st.sampled_from([0.0, 0.001, 0.05, 0.2, 0.5, 1.0]),
       spread=st.sampled_from([0.0, 1.0, 6.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       chunk=st.sampled_from([8, 64, 1024, 1 << 18]))
def test_streamed_norm_is_float64norm(n: int, seed: int, density: float, spread: float,
                                      dtype: torch.dtype, chunk: int) -> None:
    x = _values(n, seed, density, spread, dtype)
    want = Float64Norm()(x)
    assert _streamed(x, chunk) == want
    assert _streamed(x, chunk, group=1) == want  # the keep-everything fallback


def test_large_tensor_and_exact_values() -> None:
    x = _values(3 * (1 << 18) + 5, 7, 0.2, 3.0, torch.float32)
    assert _streamed(x, 1 << 18) == Float64Norm()(x)
    assert _streamed(torch.zeros(1000), 64) == 0.0
    hand = torch.zeros(37)
    hand[3], hand[36] = 3.0, 4.0  # one in a group, one in the tail
    assert _streamed(hand, 8) == 5.0


def test_pooled_norm_is_float64norm() -> None:
    """Through one reused buffer, larger tensors then smaller (a stale tail never counts)."""
    for n, dtype in [(5000, torch.float32), (70001, torch.bfloat16), (33, torch.float16),
                     (4999, torch.float32)]:
        x = _values(n, n, 0.5, 2.0, dtype)
        assert float64_norm(x) == Float64Norm()(x)
        assert float64_norm(x.reshape(-1, 1)) == Float64Norm()(x.reshape(-1, 1))
    y = torch.randn(40, 30).t()  # not contiguous, and float64: Float64Norm's own paths
    assert float64_norm(y) == Float64Norm()(y)
    assert float64_norm(y.double()) == Float64Norm()(y.double())
