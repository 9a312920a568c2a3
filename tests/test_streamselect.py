"""The streamed top-k rule keeps exactly ``selection.topk_mask``'s entries, whatever the chunking:
many ties at the threshold (a few distinct values, bf16-rounded values), masses of zeros, k at
both ends, a threshold of 0 (where kept zeros change nothing), two ranks at once."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise.selection import topk_mask
from mergewise.streamselect import KeepRule, TopKSearch, sample_step


def _rules(values: torch.Tensor, ks: list[int], chunk: int) -> list[KeepRule] | None:
    n = values.numel()
    search = TopKSearch(n, ks, values[::sample_step(n)])
    parts = [slice(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    for part in parts:
        search.feed(part, values[part])
    return search.rules(lambda part: values[part])


def _mask(rule: KeepRule, values: torch.Tensor, chunk: int) -> torch.Tensor:
    out = torch.empty_like(values)
    for i in range(0, values.numel(), chunk):
        part = slice(i, min(values.numel(), i + chunk))
        rule.mask(values[part], part, out[part])
    return out


def _check(values: torch.Tensor, k: int, chunk: int) -> None:
    rules = _rules(values, [k], chunk)
    assert rules is not None
    want = topk_mask(values, k).float()
    got = _mask(rules[0], values, chunk)
    if rules[0].threshold == 0.0:  # zeros kept or not: the same kept values
        assert torch.equal(got * values, want * values)
        assert torch.equal(got[values > 0], want[values > 0])
    else:
        assert torch.equal(got, want)


KINDS = st.sampled_from(["normal", "bf16", "few", "zeros", "const"])


def _values(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).abs()
    if kind == "bf16":
        return (x * 1e-3).bfloat16().float()
    if kind == "few":
        return torch.randint(0, 4, (n,), generator=g).float()
    if kind == "zeros":
        return x * (torch.rand(n, generator=g) < 0.07)
    if kind == "const":
        return torch.full((n,), 0.25)
    return x


@settings(max_examples=150, deadline=None)
@given(kind=KINDS, n=st.integers(1, 30000), seed=st.integers(0, 10**6),
       frac=st.floats(0.0, 1.0), chunk=st.sampled_from([7, 256, 1000, 1 << 14]))
def test_streamed_rule_is_topk_mask(kind: str, n: int, seed: int, frac: float, chunk: int) -> None:
    values = _values(kind, n, seed)
    k = min(n, max(1, round(frac * n)))
    _check(values, k, chunk)


def test_extremes_and_large_tensors() -> None:
    for kind in ("normal", "bf16", "zeros", "few"):
        values = _values(kind, 1_000_003, 1)
        for k in (1, 5, 200_000, 999_990, 1_000_002):
            _check(values, k, 1 << 18)


def test_two_ranks_in_one_pass_nest() -> None:
    values = _values("bf16", 50_000, 2)
    rules = _rules(values, [40_000, 500], 4096)
    assert rules is not None
    outer, inner = (_mask(r, values, 4096) for r in rules)
    assert torch.equal(outer, topk_mask(values, 40_000).float())
    assert torch.equal(inner, topk_mask(values, 500).float())
    assert bool((inner <= outer).all())  # breadcrumbs' band keep - drop stays 0/1


def test_k_outside_the_tensor() -> None:
    values = _values("normal", 3000, 3)
    rules = _rules(values, [3000, 0], 512)
    assert rules is not None
    assert bool(_mask(rules[0], values, 512).all()) and not bool(_mask(rules[1], values, 512).any())
