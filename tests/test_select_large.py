"""The sampled-bracket fast paths of ``topk_mask`` / ``kth_largest`` (tensors >= 2^18 entries)
must select exactly what a stable sort selects, including masses of ties and exact zeros."""

from __future__ import annotations

import pytest
import torch

from mergewise import selection
from mergewise.selection import kth_largest, topk_mask

N = selection.SELECT_DIRECT + 12_345


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(x.reshape(-1).double(), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def cases():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(N, generator=g).abs()
    zeros = gauss.clone()
    zeros[torch.rand(N, generator=g) < 0.8] = 0.0  # untouched embedding rows: a mass of zeros
    ints = torch.randint(0, 5, (N,), generator=g).float()  # heavy ties everywhere
    bf16 = torch.randn(N, generator=g).abs().to(torch.bfloat16).float()  # coarse values, ties
    const = torch.full((N,), 0.25)
    return {"gauss": gauss, "zeros": zeros, "ints": ints, "bf16": bf16, "const": const}


@pytest.mark.parametrize("name", ["gauss", "zeros", "ints", "bf16", "const"])
@pytest.mark.parametrize("fraction", [1e-5, 0.01, 0.2, 0.5, 0.9, 0.999])
def test_fast_topk_equals_stable_sort(name, fraction):
    x = cases()[name]
    k = max(1, int(fraction * N))
    got = topk_mask(x, k)
    assert int(got.sum()) == k
    assert torch.equal(got, reference_mask(x, k))


@pytest.mark.parametrize("name", ["gauss", "zeros", "ints", "bf16"])
def test_fast_kth_largest_equals_sort(name):
    x = cases()[name]
    ordered = torch.sort(x, descending=True).values
    for k in (1, 7, N // 3, N // 2, N - 1, N):
        assert kth_largest(x, k) == ordered[k - 1]


def test_fast_path_2d_and_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 500, generator=g, dtype=torch.float64).abs()
    k = 12_345
    assert torch.equal(topk_mask(x, k), reference_mask(x, k))
