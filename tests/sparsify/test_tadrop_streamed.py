"""TADrop's streamed form (``TADropStep``, what ``chunked`` runs) equals ``tadrop`` on the whole
tensor bit for bit: kept set (ties by index), rescale factor, every value, the report's figures;
and the stats pass' ||tau|| is ``l2_rescale``'s, also through the stats cache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise.numerics import Float64Norm
from mergewise.sparsify.tadrop import TADropStats, TensorDrop, _streamed, tadrop
from mergewise.streamselect import sample_step

PARAMS = {"drop_rate": 0.8, "strength": 1.0, "quantiles": [0.5, 0.95], "min_drop": 0.0,
          "max_drop": 0.99, "skip": []}


def _delta(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).pow(3)
    if kind == "bf16":  # few distinct magnitudes: ties at the threshold
        return (x * 1e-3).bfloat16().float()
    if kind == "sparse":  # most of it exact zeros (an embedding)
        return x * (torch.rand(n, generator=g) < 0.07)
    if kind == "few":
        return torch.randint(-3, 4, (n,), generator=g).float()
    return x


def _streamed_out(delta: torch.Tensor, stats: TensorDrop, rescale: str, chunk: int
                  ) -> tuple[torch.Tensor, dict[str, Any]] | None:
    n = delta.numel()
    step = _streamed(n, lambda s: delta[::s].abs(), mode="magnitude", rescale=rescale,
                     stats=stats)
    assert step is not None
    parts = [slice(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    for part in parts:
        step.feed(part, delta[part].abs())
    if not step.ready(lambda part: delta[part].abs()):
        return None
    out = torch.cat([step.apply(delta[p], delta[p].abs(), p) for p in parts])
    return out, step.report()


def _stats_of(delta: torch.Tensor, p: float) -> TensorDrop:
    norm = Float64Norm()(delta)
    return TensorDrop(delta.numel(), 0.3, p, False, norm)


@settings(max_examples=120, deadline=None)
@given(kind=st.sampled_from(["normal", "bf16", "sparse", "few"]), n=st.integers(1, 20000),
       seed=st.integers(0, 10**6), p=st.floats(0.0, 0.999, exclude_min=True),
       rescale=st.sampled_from(["l2", "none"]), chunk=st.sampled_from([8, 512, 4096]))
def test_streamed_tadrop_is_whole_tadrop(kind: str, n: int, seed: int, p: float, rescale: str,
                                         chunk: int) -> None:
    delta = _delta(kind, n, seed)
    stats = _stats_of(delta, p)
    got = _streamed_out(delta, stats, rescale, chunk)
    if got is None:  # a sampled bracket missed: chunked then takes the whole path
        return
    info: dict[str, Any] = {}
    want = tadrop(delta.clone(), stats=stats, rescale=rescale, info=info)
    assert torch.equal(got[0].view(torch.int32), want.view(torch.int32))
    assert got[1] == info


def test_hand_made_rescale() -> None:
    """|tau| = 1..8 at drop rate 0.75: keep 8 and 7 (2 of 8), factor ||tau|| / ||(7, 8)||."""
    delta = torch.tensor([1.0, -8.0, 3.0, 2.0, -7.0, 5.0, 6.0, 4.0])
    stats = _stats_of(delta, 0.75)
    got = _streamed_out(delta, stats, "l2", 8)
    assert got is not None
    factor = (204.0 / 113.0) ** 0.5
    assert got[1] == {"d": 0.3, "drop_rate": 0.75, "rescale": factor}
    assert torch.equal(got[0], torch.tensor([0.0, -8.0, 0.0, 0.0, -7.0, 0.0, 0.0, 0.0]) * factor)


def test_kept_as_is_or_random_takes_the_whole_path() -> None:
    n = 64
    whole = {"mode": "magnitude", "rescale": "l2"}
    assert _streamed(n, None, stats=None, **whole) is None
    assert _streamed(n, None, stats=TensorDrop(n, None, 0.0, False, 1.0), **whole) is None
    assert _streamed(n, None, stats=TensorDrop(n, 0.2, 0.0, False, 1.0), **whole) is None
    assert _streamed(n, None, stats=TensorDrop(n, None, 0.0, True), **whole) is None
    assert _streamed(n, None, stats=TensorDrop(n, 0.2, 0.5, False), **whole) is None  # no norm
    sample = torch.ones(n)
    assert _streamed(n, lambda s: sample[::s], stats=TensorDrop(n, 0.2, 0.5, False, 1.0),
                     mode="random", rescale="l2") is None
    assert sample_step(n) == 1


def test_stats_pass_norm_and_its_cache() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(300 + i, generator=g) * (i + 1) for i in range(3)}
    stats = TADropStats()
    for name, t in tensors.items():
        stats.observe(0, name, t, PARAMS)
    stats.end_pass(0)
    cached = TADropStats()
    for name, t in tensors.items():
        value = stats.observed(name)
        assert value == [stats.for_tensor(name).d, Float64Norm()(t)]
        assert cached.cached_ok(value)
        cached.observe_cached(0, name, value, t.numel(), PARAMS)
    cached.end_pass(0)
    assert all(cached.for_tensor(n) == stats.for_tensor(n) for n in tensors)
    assert stats.for_tensor("t1").norm == Float64Norm()(tensors["t1"])


@pytest.mark.parametrize("bad", [0.3, None, [0.3], [0.3, None], [0.3, -1.0], [0.3, float("inf")],
                                 ["x", 1.0], [0.3, True], {"d": 0.3}])
def test_a_bad_cached_value_is_refused(bad: Any) -> None:
    assert not TADropStats().cached_ok(bad)


def test_cached_ok_takes_a_zero_tensor() -> None:
    assert TADropStats().cached_ok([None, 0.0])


def test_ties_cut_inside_a_chunk() -> None:
    """40 equal magnitudes at drop rate 0.5: the first 20 are kept, the cut falls inside the
    second chunk of 16, and the factor is sqrt(40 / 20)."""
    signs = torch.tensor([(-1.0) ** (i % 3) for i in range(40)])
    delta = 0.5 * signs
    stats = _stats_of(delta, 0.5)
    got = _streamed_out(delta, stats, "l2", 16)
    assert got is not None
    want = tadrop(delta.clone(), stats=stats, rescale="l2")
    assert torch.equal(got[0], want)
    assert torch.equal(got[0][:20], delta[:20] * 2.0 ** 0.5) and not got[0][20:].any()
    assert got[1]["rescale"] == 2.0 ** 0.5
