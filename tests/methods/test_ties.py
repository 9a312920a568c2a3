"""TIES-Merging: trim, weight, elect sign (0 counts as +), disjoint merge, theta0 + lambda tau."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.ties import ties_merge

# Three hand-made task vectors (2 x 3). Column sums (weights 1):
#   (0,0)  1 + 2 - 1 =  2  -> +   agreeing: 1, 2        mean 1.5
#   (0,1) -2 - 3 + 1 = -4  -> -   agreeing: -2, -3      mean -2.5
#   (0,2)  3 - 3 + 1 =  1  -> +   agreeing: 3, 1        mean 2
#   (1,0)  0 + 0 + 0 =  0  -> +   nobody (all zero)     0
#   (1,1)  4 - 4 + 0 =  0  -> +   agreeing: 4           4       (exact-zero sum counts as +)
#   (1,2) -1 - 1 + 2 =  0  -> +   agreeing: 2           2       (exact-zero sum counts as +)
D1 = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])
D2 = torch.tensor([[2.0, -3.0, -3.0], [0.0, -4.0, -1.0]])
D3 = torch.tensor([[-1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
BASE = torch.tensor([[10.0, 10.0, 10.0], [-1.0, -1.0, -1.0]])


def test_registration() -> None:
    m = METHODS.get("ties")
    assert m.func is ties_merge
    assert m.space == "delta"
    assert m.sparsifier == "magnitude"
    assert m.sparsifier_defaults == {}  # magnitude's density 1.0: mergekit trims only if asked
    assert next(p for p in m.params if p.name == "normalize").default is True


def test_mean_with_zero_sum_election() -> None:
    out = ties_merge(torch.zeros(2, 3), [D1, D2, D3], [1.0, 1.0, 1.0])
    assert torch.equal(out, torch.tensor([[1.5, -2.5, 2.0], [0.0, 4.0, 2.0]]))


def test_base_and_lambda() -> None:
    out = ties_merge(BASE, [D1, D2, D3], [1.0, 1.0, 1.0], lam=1.0, aggregate="mean")
    assert torch.equal(out, torch.tensor([[11.5, 7.5, 12.0], [-1.0, 3.0, 1.0]]))
    # lambda 0.5: base + [[0.75, -1.25, 1], [0, 2, 1]]
    out = ties_merge(BASE, [D1, D2, D3], [1.0, 1.0, 1.0], lam=0.5)
    assert torch.equal(out, torch.tensor([[10.75, 8.75, 11.0], [-1.0, 1.0, 0.0]]))


def test_sum_aggregate() -> None:
    # agreeing sums: 1+2, -2-3, 3+1, 0, 4, 2
    out = ties_merge(torch.zeros(2, 3), [D1, D2, D3], [1.0, 1.0, 1.0], aggregate="sum")
    assert torch.equal(out, torch.tensor([[3.0, -5.0, 4.0], [0.0, 4.0, 2.0]]))


# Weights 3, 1, 1: weighted D1 = [[3, -6, 9], [0, 12, -3]]. Sums of weighted vectors:
#   (0,0)  3 + 2 - 1 =  4 +  agreeing (w*tau, w): (3,3) (2,1)     mean 2.5   sum 5   wmean 5/4
#   (0,1) -6 - 3 + 1 = -8 -  agreeing: (-6,3) (-3,1)              mean -4.5  sum -9  wmean -9/4
#   (0,2)  9 - 3 + 1 =  7 +  agreeing: (9,3) (1,1)                mean 5     sum 10  wmean 10/4
#   (1,0)  0             +  nobody                               0
#   (1,1) 12 - 4 + 0 =  8 +  agreeing: (12,3)                     mean 12    sum 12  wmean 12/3
#   (1,2) -3 - 1 + 2 = -2 -  agreeing: (-3,3) (-1,1)              mean -2    sum -4  wmean -4/4
# (1,2) shows the weight acting before the vote: unweighted the sum is 0 (+) and the result 2.
@pytest.mark.parametrize(("aggregate", "expected"), [
    ("mean", [[2.5, -4.5, 5.0], [0.0, 12.0, -2.0]]),
    ("sum", [[5.0, -9.0, 10.0], [0.0, 12.0, -4.0]]),
    ("weighted_mean", [[1.25, -2.25, 2.5], [0.0, 4.0, -1.0]]),
])
def test_weights_before_election(aggregate: str, expected: list[list[float]]) -> None:
    out = ties_merge(torch.zeros(2, 3), [D1, D2, D3], [3.0, 1.0, 1.0], aggregate=aggregate)
    assert torch.equal(out, torch.tensor(expected))


def test_weighted_mean_equal_weights_is_mean() -> None:
    out = ties_merge(torch.zeros(2, 3), [D1, D2, D3], [1.0, 1.0, 1.0], aggregate="weighted_mean")
    assert torch.equal(out, torch.tensor([[1.5, -2.5, 2.0], [0.0, 4.0, 2.0]]))


def test_all_zero_task_vectors_give_base() -> None:
    z = torch.zeros(2, 3)
    for aggregate in ("mean", "sum", "weighted_mean"):
        out = ties_merge(BASE, [z, z], [1.0, 2.0], lam=3.0, aggregate=aggregate)
        assert torch.equal(out, BASE)


def test_one_element_zero_sum_and_inputs_untouched() -> None:
    a, b = torch.tensor([-1.0]), torch.tensor([1.0])
    out = ties_merge(torch.tensor([5.0]), [a, b], [1.0, 1.0])  # sum 0 -> + -> 1
    assert torch.equal(out, torch.tensor([6.0]))
    assert torch.equal(a, torch.tensor([-1.0])) and torch.equal(b, torch.tensor([1.0]))
    out = ties_merge(torch.tensor([5.0]), [a, b], [2.0, 1.0], aggregate="mean")  # -2 + 1 < 0
    assert torch.equal(out, torch.tensor([3.0]))  # -> -2 / one agreeing model
    out = ties_merge(torch.tensor([5.0]), [a, b], [2.0, 1.0])  # normalize: -2 / its weight 2
    assert torch.equal(out, torch.tensor([4.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_compute_dtypes(dtype: torch.dtype) -> None:
    # float16: the 0/0 guard for entries nobody agrees on must not underflow to NaN
    out = ties_merge(torch.zeros(2, 3, dtype=dtype), [D1.to(dtype), D2.to(dtype), D3.to(dtype)],
                     [3.0, 1.0, 1.0], aggregate="weighted_mean")
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor([[1.25, -2.25, 2.5], [0.0, 4.0, -1.0]], dtype=dtype))
    out = ties_merge(torch.zeros(2, 3, dtype=dtype), [D1.to(dtype), D2.to(dtype), D3.to(dtype)],
                     [1.0, 1.0, 1.0])
    assert torch.equal(out, torch.tensor([[1.5, -2.5, 2.0], [0.0, 4.0, 2.0]], dtype=dtype))


# --- properties of the elect + merge step -----------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(data=st.data(), k=st.integers(1, 4), n=st.integers(1, 12),
       aggregate=st.sampled_from(["mean", "sum", "weighted_mean"]))
def test_property_sign_agrees_with_election(data: st.DataObject, k: int, n: int,
                                            aggregate: str) -> None:
    deltas = [torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)),
                           dtype=torch.float64) for _ in range(k)]
    weights = data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=k, max_size=k))
    base = torch.zeros(n, dtype=torch.float64)
    out = ties_merge(base, deltas, weights, aggregate=aggregate)
    weighted = torch.stack([w * d for w, d in zip(weights, deltas, strict=True)])
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agreeing = (weighted * elected) > 0
    # non-zero exactly where somebody agrees, and then with the elected sign
    assert torch.equal(out != 0, agreeing.any(0))
    assert bool((out * elected >= 0).all())
    if aggregate == "mean":
        # a mean of agreeing values lies between their min and max magnitude
        mag = torch.where(agreeing, weighted.abs(), torch.nan)
        has = agreeing.any(0)
        lo = torch.nan_to_num(mag, nan=float("inf")).amin(0)
        hi = torch.nan_to_num(mag, nan=0.0).amax(0)
        assert bool((out.abs()[has] >= lo[has] - 1e-12).all())
        assert bool((out.abs()[has] <= hi[has] + 1e-12).all())


# --- through the public API -------------------------------------------------------------------

def _ones_base_sds() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = torch.ones(2, 3)
    return {"w": base.clone()}, [{"w": base + d} for d in (D1, D2, D3)]


def test_api_density_keeps_one_of_six() -> None:
    base, models = _ones_base_sds()
    # density 0.2 on 6 -> round-half-up(1.2) = 1: D1 keeps 4 (flat 4), D2 -4 (flat 4),
    # D3 2 (flat 5). Flat 4: 4 - 4 = 0 -> + -> 4. Flat 5: 2.
    out = merge_state_dicts(base, models, "ties", parameters={"density": 0.2})
    assert torch.equal(out["w"], torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 3.0]]))


def test_api_default_density_is_no_trim() -> None:
    """mergekit's default density 1.0: every entry votes (ties_merge on the whole vectors)."""
    base, models = _ones_base_sds()
    out = merge_state_dicts(base, models, "ties")
    deltas = [m["w"] - base["w"] for m in models]
    assert torch.equal(out["w"], ties_merge(base["w"], deltas, [1.0, 1.0, 1.0]))


def test_api_trim_half() -> None:
    base, models = _ones_base_sds()
    # density 0.5 -> 3 kept, ties to the lowest index:
    #   D1 |.| 1 2 3 0 4 1 -> [[0, -2, 3], [0, 4, 0]]
    #   D2 |.| 2 3 3 0 4 1 -> [[0, -3, -3], [0, -4, 0]]
    #   D3 |.| 1 1 1 0 0 2 -> 2, then the |1| at flat 0 and 1 -> [[-1, 1, 0], [0, 0, 2]]
    # sums [[-1, -4, 0], [0, 0, 2]] -> signs [[-, -, +], [+, +, +]]
    # mean: [[-1, (-2-3)/2, 3], [0, 4, 2]]; + 1
    out = merge_state_dicts(base, models, "ties", parameters={"density": 0.5})
    assert torch.equal(out["w"], torch.tensor([[0.0, -1.5, 4.0], [1.0, 5.0, 3.0]]))
    # sum aggregate and lambda 2: 1 + 2 * [[-1, -5, 3], [0, 4, 2]]
    out = merge_state_dicts(base, models, "ties",
                            parameters={"density": 0.5, "aggregate": "sum", "lambda": 2.0})
    assert torch.equal(out["w"], torch.tensor([[-1.0, -9.0, 7.0], [1.0, 9.0, 5.0]]))


def test_api_weights_and_per_model_density() -> None:
    base, models = _ones_base_sds()
    # densities 0.5, 0.5, 1.0: trimmed D1, D2 as above, D3 whole.
    # weights 1, 1, 4: 4 D3 = [[-4, 4, 4], [0, 0, 8]]
    # sums: [[0 + 0 - 4, -2 - 3 + 4, 3 - 3 + 4], [0, 4 - 4 + 0, 0 + 0 + 8]] = [[-4, -1, 4], [0, 0, 8]]
    # weighted_mean: (0,0) -4/4 = -1; (0,1) (-2-3)/2 = -2.5; (0,2) (3+4)/(1+4) = 1.4;
    #                (1,0) 0; (1,1) sum 0 -> + -> 4/1; (1,2) 8/4 = 2
    out = merge_state_dicts(base, models, "ties",
                            parameters={"aggregate": "weighted_mean"},
                            model_parameters=[{"density": 0.5}, {"density": 0.5},
                                              {"density": 1.0, "weight": 4.0}])
    torch.testing.assert_close(out["w"], torch.tensor([[0.0, -1.5, 2.4], [1.0, 5.0, 3.0]]),
                               rtol=0, atol=1e-6)


# --- global TIES against a reference written here ----------------------------------------------

def _keep(density: float, n: int) -> int:
    k = int((Decimal(repr(density)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return max(1, min(n, k)) if density > 0 else 0


def _reference_ties(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
                    densities: list[float], weights: list[float], lam: float, aggregate: str,
                    scope: str) -> dict[str, torch.Tensor]:
    """TIES in float64: trim (model-wide stable sort, or per tensor), elect, disjoint merge."""
    names = [n for n, t in base.items() if t.is_floating_point()]
    trimmed: list[dict[str, torch.Tensor]] = []
    for sd, density in zip(models, densities, strict=True):
        taus = {n: sd[n].double() - base[n].double() for n in names}
        groups = [names] if scope == "global" else [[n] for n in names]
        kept: dict[str, torch.Tensor] = {}
        for group in groups:
            flat = torch.cat([taus[n].reshape(-1) for n in group])
            order = torch.sort(flat.abs(), descending=True, stable=True).indices
            mask = torch.zeros(flat.numel(), dtype=torch.bool)
            mask[order[:_keep(density, flat.numel())]] = True
            parts = torch.split(flat * mask, [taus[n].numel() for n in group])
            kept.update({n: p.reshape(taus[n].shape) for n, p in zip(group, parts, strict=True)})
        trimmed.append(kept)
    out = {}
    for n in names:
        weighted = torch.stack([w * t[n] for w, t in zip(weights, trimmed, strict=True)])
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        agree = weighted * sign > 0
        total = torch.where(agree, weighted, 0.0).sum(0)
        if aggregate == "mean":
            total = total / agree.sum(0).clamp(min=1)
        elif aggregate == "weighted_mean":
            w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * total.dim())
            den = (agree * w).sum(0)
            total = total / torch.where(den == 0, 1.0, den)
        out[n] = base[n].double() + lam * total
    return out


def _global_sds() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = {"a": torch.full((2, 2), 0.5), "b": torch.full((3,), 0.5)}
    m1 = {"a": base["a"] + torch.tensor([[1.0, -1.0], [1.0, 0.0]]),
          "b": base["b"] + torch.tensor([3.0, -2.0, 3.0])}
    m2 = {"a": base["a"] + torch.tensor([[-2.0, 1.0], [1.0, 1.0]]),
          "b": base["b"] + torch.tensor([-1.0, 2.0, -2.0])}
    return base, [m1, m2]


def test_api_global_hand_values() -> None:
    base, models = _global_sds()
    # N = 7, density 0.4 -> round-half-up(2.8) = 3 per model, model-wide:
    #   m1 |tau| = a: 1 1 1 0, b: 3 2 3 -> all of b:     a 0,               b [3, -2, 3]
    #   m2 |tau| = a: 2 1 1 1, b: 1 2 2 -> a[0,0], b[1], b[2]: a [[-2, 0], [0, 0]], b [0, 2, -2]
    # a: only -2 at (0,0). b: sums [3, 0, 1] -> +, +(zero sum), + -> [3, 2, 3]
    out = merge_state_dicts(base, models, "ties",
                            parameters={"density": 0.4, "scope": "global"})
    assert torch.equal(out["a"], torch.tensor([[-1.5, 0.5], [0.5, 0.5]]))
    assert torch.equal(out["b"], torch.tensor([3.5, 2.5, 3.5]))
    # per tensor at the same density the answer differs:
    #   a keeps round-half-up(1.6) = 2: m1 [[1, -1], [0, 0]], m2 [[-2, 1], [0, 0]]
    #     -> (0,0) sum -1: -2; (0,1) sum 0: + -> 1
    #   b keeps round-half-up(1.2) = 1: m1 [3, 0, 0], m2 [0, 2, 0] -> [3, 2, 0]
    out = merge_state_dicts(base, models, "ties", parameters={"density": 0.4})
    assert torch.equal(out["a"], torch.tensor([[-1.5, 1.5], [0.5, 0.5]]))
    assert torch.equal(out["b"], torch.tensor([3.5, 2.5, 0.5]))


def test_api_global_matches_reference_hand_case() -> None:
    base, models = _global_sds()
    for density in (0.4, 0.5, 0.99):
        ref = _reference_ties(base, models, [density] * 2, [1.0, 1.0], 1.0, "mean", "global")
        out = merge_state_dicts(base, models, "ties",
                                parameters={"density": density, "scope": "global"})
        for n in base:
            assert torch.equal(out[n].double(), ref[n]), (density, n)


def test_api_inputs_not_modified() -> None:
    base, models = _global_sds()
    copies = [{n: t.clone() for n, t in sd.items()} for sd in [base, *models]]
    for scope in ("global", "tensor"):
        merge_state_dicts(base, models, "ties", parameters={"density": 0.4, "scope": scope})
        for sd, copy in zip([base, *models], copies, strict=True):
            for n in sd:
                assert torch.equal(sd[n], copy[n]), n


def test_api_global_keep_everything() -> None:
    base, models = _global_sds()
    # 7 * 0.95 = 6.65 -> 7: no trim at all; sums a [[-1, 0], [2, 1]], b [2, 0, 1]
    #   a: (0,0) - -> -2; (0,1) 0 -> + -> 1; (1,0) (1+1)/2 = 1; (1,1) 1
    #   b: (0) 3; (1) 0 -> + -> 2; (2) 3
    out = merge_state_dicts(base, models, "ties",
                            parameters={"density": 0.95, "scope": "global"})
    assert torch.equal(out["a"], torch.tensor([[-1.5, 1.5], [1.5, 1.5]]))
    assert torch.equal(out["b"], torch.tensor([3.5, 2.5, 3.5]))


def _random_int_sds(seed: int, dtype: torch.dtype, values: int = 2
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (5, 4), "layer.0.w": (3, 3), "layer.0.b": (3,), "one": (1,), "head": (4, 2)}
    base = {n: torch.randint(-3, 4, s, generator=g).to(dtype) / 4 for n, s in shapes.items()}
    base["position_ids"] = torch.arange(6)  # integer buffer: copied, not part of the top-k
    models = []
    for _ in range(3):
        models.append({n: (t + torch.randint(-values, values + 1, t.shape, generator=g).to(dtype)
                           if t.is_floating_point() else t.clone())
                       for n, t in base.items()})
    return base, models


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    """Sums of quarters are exact in any dtype; means (/3, /3.5 ...) differ by the last rounding.

    A wrong selection or election moves an entry by at least 0.75 * 0.25, far above these
    tolerances (values are below 30).
    """
    if exact:
        assert torch.equal(out, ref.to(out.dtype))
        return
    rtol = {torch.float64: 1e-15, torch.float32: 2e-7, torch.bfloat16: 2.0**-8}[out.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("in_dtype", "compute"), [
    (torch.float32, "float32"),
    (torch.float64, "float64"),
    (torch.float32, "float64"),
    (torch.bfloat16, "float32"),
])
def test_api_global_many_ties_matches_reference(seed: int, in_dtype: torch.dtype,
                                                compute: str) -> None:
    base, models = _random_int_sds(seed, in_dtype)  # task vectors in {-2..2}: heavy ties
    density = (0.2, 0.35, 0.5, 0.7)[seed]
    weights = [1.0, 2.0, 0.5]
    for aggregate in ("mean", "sum", "weighted_mean"):
        ref = _reference_ties(base, models, [density, 0.3, density], weights, 0.75, aggregate,
                              "global")
        out = merge_state_dicts(base, models, "ties",
                                parameters={"density": density, "scope": "global",
                                            "aggregate": aggregate, "lambda": 0.75},
                                model_parameters=[{"weight": 1.0}, {"weight": 2.0, "density": 0.3},
                                                  {"weight": 0.5}],
                                dtype=compute, out_dtype=str(in_dtype).removeprefix("torch."))
        assert torch.equal(out["position_ids"], base["position_ids"])
        for n, r in ref.items():
            assert out[n].dtype == in_dtype
            _assert_matches(out[n], r, exact=aggregate == "sum")


def test_api_global_differs_from_per_tensor_on_skewed_tensors() -> None:
    base, models = _random_int_sds(5, torch.float32)
    for m in models:  # make one tensor's task vector dominate in magnitude
        m["head"] = base["head"] + 10 * (m["head"] - base["head"])
    glob = merge_state_dicts(base, models, "ties", parameters={"density": 0.2, "scope": "global"})
    per = merge_state_dicts(base, models, "ties", parameters={"density": 0.2})
    ref_g = _reference_ties(base, models, [0.2] * 3, [1.0] * 3, 1.0, "mean", "global")
    ref_t = _reference_ties(base, models, [0.2] * 3, [1.0] * 3, 1.0, "mean", "tensor")
    for n in ref_g:
        _assert_matches(glob[n], ref_g[n], exact=False)
        _assert_matches(per[n], ref_t[n], exact=False)
    assert not torch.equal(glob["embed"], per["embed"])


# --- bf16 inputs ---------------------------------------------------------------------------

def test_api_bf16_inputs_against_float64_reference() -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 8, generator=g).bfloat16(), "v": torch.randn(5, generator=g).bfloat16()}
    models = [{n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).bfloat16()
               for n, t in base.items()} for _ in range(3)]
    params = {"density": 0.5, "lambda": 0.8}
    weights = [{"weight": 1.0}, {"weight": 0.5}, {"weight": 1.5}]
    out = merge_state_dicts(base, models, "ties", parameters=params, model_parameters=weights)
    up = {n: t.double() for n, t in base.items()}
    ref = merge_state_dicts(up, [{n: t.double() for n, t in m.items()} for m in models], "ties",
                            parameters=params, model_parameters=weights, dtype="float64")
    # the default normalize: true divides by the agreeing models' weights
    ref_hand = _reference_ties(base, models, [0.5] * 3, [1.0, 0.5, 1.5], 0.8, "weighted_mean",
                               "tensor")
    for n in base:
        assert out[n].dtype == torch.bfloat16
        assert ref[n].dtype == torch.float64
        torch.testing.assert_close(ref[n], ref_hand[n], rtol=1e-12, atol=1e-12)
        # bf16 inputs are exact in float32, so the only real error is the final rounding to
        # bf16 (half an ulp, 2^-9 relative); allow one ulp
        torch.testing.assert_close(out[n].double(), ref[n], rtol=2.0**-8, atol=1e-6)
    out32 = merge_state_dicts(base, models, "ties", parameters=params, model_parameters=weights,
                              out_dtype="float32")
    for n in base:
        assert out32[n].dtype == torch.float32
        torch.testing.assert_close(out32[n].double(), ref[n], rtol=1e-6, atol=1e-6)
