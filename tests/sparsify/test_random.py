"""DARE random drop: Bernoulli keep mask from the given generator; kept entries rescaled to the
tensor's L1 norm (mergekit's rescale) or by 1/density (``rescale_rule: density``, the paper)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import SPARSIFIERS
from mergewise.rng import tensor_generator
from mergewise.sparsify.random import random_drop


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registered_as_random() -> None:
    sp = SPARSIFIERS.get("random")
    assert sp.func is random_drop
    assert sp.random


def test_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        random_drop(torch.ones(3), density=0.5)


def test_density_one_is_identity() -> None:
    delta = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(random_drop(delta, density=1.0, generator=_gen(0)), delta)
    assert torch.equal(random_drop(delta, density=1.0), delta)  # no draw needed


def test_rescale_by_inverse_density() -> None:
    delta = torch.tensor([[1.0, -2.0, 3.0], [0.5, -0.25, 4.0]])
    out = random_drop(delta, density=0.5, rescale_rule="density", generator=_gen(3))
    kept = out != 0
    # every entry is either dropped or exactly doubled (1 / 0.5)
    assert torch.equal(out[kept], delta[kept] * 2.0)
    assert torch.equal(out[~kept], torch.zeros(int((~kept).sum())))
    # and the mask is the generator's first draw of uniforms below 0.5
    expected_keep = torch.rand(delta.shape, generator=_gen(3)) < 0.5
    assert torch.equal(kept, expected_keep)


def test_rescale_to_l1_norm_by_default() -> None:
    """mergekit's rule: kept entries x (sum |delta| / sum |kept|), computed in the dtype."""
    delta = torch.tensor([[1.0, -2.0, 3.0], [0.5, -0.25, 4.0]])  # sum |.| = 10.75
    out = random_drop(delta, density=0.5, generator=_gen(3))
    keep = torch.rand(delta.shape, generator=_gen(3)) < 0.5
    kept = delta * keep
    assert torch.equal(out, kept * (delta.abs().sum() / kept.abs().sum()))
    assert float(out.abs().sum()) == pytest.approx(10.75, rel=1e-6)
    # a tensor whose kept entries have (almost) no mass is left unscaled, as mergekit
    tiny = torch.full((8,), 1e-9)
    out = random_drop(tiny, density=0.5, generator=_gen(1))
    assert torch.equal(out, tiny * (torch.rand(8, generator=_gen(1)) < 0.5))


def test_no_rescale() -> None:
    delta = torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, -8.0])
    out = random_drop(delta, density=0.25, rescale=False, generator=_gen(1))
    keep = torch.rand(delta.shape, generator=_gen(1)) < 0.25
    assert torch.equal(out, torch.where(keep, delta, torch.zeros_like(delta)))


def test_same_generator_state_same_mask_different_seed_other_mask() -> None:
    delta = torch.arange(1.0, 65.0)
    a = random_drop(delta, density=0.5, generator=tensor_generator(0, 0, "w"))
    b = random_drop(delta, density=0.5, generator=tensor_generator(0, 0, "w"))
    c = random_drop(delta, density=0.5, generator=tensor_generator(1, 0, "w"))
    d = random_drop(delta, density=0.5, generator=tensor_generator(0, 1, "w"))
    e = random_drop(delta, density=0.5, generator=tensor_generator(0, 0, "v"))
    assert torch.equal(a, b)
    # 64 fair coin flips: a collision has probability 2^-64
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    assert not torch.equal(a, e)


def test_keep_rate_close_to_density() -> None:
    delta = torch.ones(100, 100)
    out = random_drop(delta, density=0.25, rescale_rule="density", generator=_gen(7))
    kept = int((out != 0).sum())
    # Binomial(10000, 0.25): mean 2500, sd 43.3; +-6 sd
    assert 2240 <= kept <= 2760
    assert torch.equal(out[out != 0], torch.full((kept,), 4.0))


def test_one_element_and_dtypes() -> None:
    out = random_drop(torch.tensor([3.0]), density=0.5, rescale_rule="density", generator=_gen(0))
    keep = bool(torch.rand(1, generator=_gen(0))[0] < 0.5)
    assert torch.equal(out, torch.tensor([6.0 if keep else 0.0]))
    d64 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out64 = random_drop(d64, density=0.5, generator=_gen(2))
    assert out64.dtype == torch.float64
    # the same generator state gives the same mask for any dtype (drawn in float32)
    out32 = random_drop(d64.float(), density=0.5, generator=_gen(2))
    assert torch.equal(out64 != 0, out32 != 0)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.sampled_from([-4.0, -1.0, -0.5, 0.25, 1.0, 3.0]), min_size=1,
                       max_size=40),
       density=st.sampled_from([0.1, 0.25, 0.5, 0.8, 0.9]), seed=st.integers(0, 2**31 - 1))
def test_property_mask_and_rescale(values: list[float], density: float, seed: int) -> None:
    delta = torch.tensor(values)
    out = random_drop(delta, density=density, rescale_rule="density", generator=_gen(seed))
    keep = torch.rand(delta.shape, generator=_gen(seed)) < density
    assert torch.equal(out != 0, keep)  # values are non-zero: kept == non-zero
    assert torch.equal(out[keep], delta[keep] / density)
    l1 = random_drop(delta, density=density, generator=_gen(seed))
    assert torch.equal(l1 != 0, keep)
    if keep.any():  # the L1 norm is kept (to float32 rounding)
        assert float(l1.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)


def test_l1_sum_is_the_same_whole_or_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of REPORT_CHUNK summed in float64, in order: a tensor fed chunk by chunk (the
    streamed DARE) gets the bits of the whole tensor's sum, close to the exact float64 sum."""
    from mergewise import numerics

    monkeypatch.setattr(numerics, "REPORT_CHUNK", 64)
    t = torch.randn(1000, generator=_gen(5)) * 1e-3
    whole = numerics.l1_sum(t.reshape(10, 100))
    parts = numerics.L1Sum()
    for i in range(0, 1000, 128):  # chunks that are multiples of the piece
        parts.add(t[i:i + 128])
    assert parts.total == whole
    assert whole == pytest.approx(float(t.double().abs().sum()), rel=1e-15)
    keep = torch.rand(1000, generator=_gen(6)) < 0.5
    masked = numerics.L1Sum()
    masked.add(t.abs(), keep)
    assert masked.total == numerics.l1_sum(t * keep)


def test_streamed_step_equals_whole_drop() -> None:
    """RandomStep fed chunk by chunk = random_drop on the whole tensor, bit for bit."""
    from mergewise.sparsify.random import RandomStep

    delta = torch.randn(3000, generator=_gen(8))
    for rule, rescale in (("l1", True), ("density", True), ("l1", False)):
        want = random_drop(delta, density=0.3, rescale=rescale, rescale_rule=rule,
                           generator=_gen(9))
        step = RandomStep(3000, _gen(9), 0.3, rescale, rule)
        parts = [slice(i, min(3000, i + 700)) for i in range(0, 3000, 700)]
        for part in parts:
            step.feed(part, delta[part].abs())
        assert step.ready()
        got = torch.cat([step.apply(delta[p], delta[p].abs(), p) for p in parts])
        assert torch.equal(got, want), rule
