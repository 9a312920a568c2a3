"""The parity harness's own arithmetic, checked without mergekit: ulps, the k rules, the bands
that excuse top-k differences and the distribution checks' false-alarm rate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_compare import (  # noqa: E402
    Output,
    Sample,
    _band,
    breadcrumbs_cuts,
    compare_distribution,
    magnitude_cuts,
    round_half_up,
    ulp,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ulp_is_the_gap_to_the_neighbours(dtype: torch.dtype) -> None:
    x = torch.tensor([1.0, -3.0, 0.1, 1e-3, 2.0 ** -20], dtype=dtype)
    up = torch.nextafter(x.float(), torch.full_like(x.float(), 1e9)).to(dtype) if dtype == torch.float32 \
        else (x.view(torch.int16) + torch.where(x > 0, 1, -1).to(torch.int16)).view(dtype)
    gap = (up.double() - x.double()).abs()
    assert torch.equal(ulp(x.double(), dtype), gap)
    assert float(ulp(torch.zeros(1, dtype=torch.float64), dtype)) == torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def test_round_half_up_is_exact() -> None:
    assert round_half_up(0.35, 10) == 4  # 0.35 * 10 = 3.4999999999999996 in floats
    assert round_half_up(0.2, 2048) == 410 and int(0.2 * 2048) == 409


def _mergekit_magnitude(mag: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * mag.numel()))
    keep = torch.zeros_like(mag, dtype=torch.bool)
    keep[torch.argsort(mag, descending=True)[:k]] = True
    return keep


def _by_index_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Top k, ties to the lower index (mergewise's documented rule)."""
    order = sorted(range(mag.numel()), key=lambda i: (-float(mag[i]), i))
    keep = torch.zeros_like(mag, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def _explained(mag: torch.Tensor, cuts: list[tuple[int, int]]) -> torch.Tensor:
    ordered = torch.sort(mag, descending=True).values
    ok = torch.zeros_like(mag, dtype=torch.bool)
    for k1, k2 in cuts:
        band = _band(ordered, k1, k2)
        if band is not None:
            ok |= (mag >= band[0]) & (mag <= band[1])
    return ok


@pytest.mark.parametrize("seed", range(6))
def test_magnitude_differences_lie_in_the_band(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 300, (1,), generator=g))
    mag = torch.randint(0, 6, (n,), generator=g).float() if seed % 2 else torch.rand(n, generator=g)
    for density in (0.1, 0.2, 0.35, 0.5, 0.9):
        mk = _mergekit_magnitude(mag, density)
        mw = _by_index_topk(mag, max(1, round_half_up(density, n)))
        assert not bool(((mk ^ mw) & ~_explained(mag, magnitude_cuts(n, density))).any())


@pytest.mark.parametrize("seed", range(6))
def test_breadcrumbs_differences_lie_in_the_bands(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 300, (1,), generator=g))
    mag = torch.randint(0, 6, (n,), generator=g).float() if seed % 2 else torch.rand(n, generator=g)
    for density, gamma in ((0.8, 0.05), (0.7, 0.02), (0.5, 0.3), (0.9, 0.2)):
        target, bot = int(density * n), max(0, n - int(density * n) - int(gamma * n))
        mk = torch.zeros(n, dtype=torch.bool)
        mk[torch.sort(mag).indices[bot:bot + target]] = True
        outliers = min(round_half_up(gamma, n), n - 1)
        kept = min(max(1, round_half_up(density, n)), n - outliers)
        mw = _by_index_topk(mag, outliers + kept) & ~_by_index_topk(mag, outliers)
        assert not bool(((mk ^ mw) & ~_explained(mag, breadcrumbs_cuts(n, density, gamma))).any())


def test_distribution_checks_accept_same_law_and_catch_a_missing_rescale() -> None:
    """Two independent DARE draws of one delta pass; dropping the 1/density rescale fails."""
    g = torch.Generator().manual_seed(0)
    delta = 0.01 * torch.randn(64, 128, generator=g, dtype=torch.float64)

    def draw(seed: int, scale: float) -> torch.Tensor:
        keep = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
        return delta * keep * scale

    def output(merged: torch.Tensor) -> Output:
        return Output(Path("."), {"w": merged.float()}, {}, None, None)

    def sample(name: str, out: Output) -> Sample:
        return Sample(out.tensors[name].double(), None, 1e-9)

    same = compare_distribution(output(draw(1, 1 / 0.3)), output(draw(2, 1 / 0.3)), sample)
    assert not same.problems, same.problems
    unscaled = compare_distribution(output(draw(1, 1 / 0.3)), output(draw(2, 1.0)), sample)
    assert any("mean square" in p for p in unscaled.problems), unscaled.problems
