"""EMR-Merging: elect (0 sum counts as -), masks, unified vector, rescalers (sum of per-tensor
means), task models theta0 + lambda_t (M_t * tau_uni); bit-packed masks; refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import (
    METHODS,
    ModulatorError,
    RecipeError,
    UnknownTaskError,
    merge_state_dicts,
    merge_task_state_dicts,
    parse_recipe,
)
from mergewise.methods.emr import emr_merge
from mergewise.modulators import pack_mask, unpack_mask
from mergewise.sparsify.magnitude import magnitude

# Three hand-made task vectors. Tensor "w" (2 x 3), column sums and elected signs:
#   (0,0)  1 + 2 - 1 =  2 +    M = 1 1 0   |tau_uni| = max(1, 2) = 2
#   (0,1) -2 - 3 + 1 = -4 -    M = 1 1 0   3
#   (0,2)  3 - 3 + 1 =  1 +    M = 1 0 1   3
#   (1,0)  0 + 0 + 0 =  0 -    M = 0 0 0   0   (all-zero entry)
#   (1,1)  4 - 4 + 0 =  0 -    M = 0 1 0   4   (sign tie: an exact 0 sum elects -)
#   (1,2) -1 - 1 + 2 =  0 -    M = 1 1 0   1   (tie: the negative entries are kept)
W1 = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])
W2 = torch.tensor([[2.0, -3.0, -3.0], [0.0, -4.0, -1.0]])
W3 = torch.tensor([[-1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
W_UNI = torch.tensor([[2.0, -3.0, 3.0], [0.0, -4.0, -1.0]])
W_MASKS = [torch.tensor([[1, 1, 1], [0, 0, 1]]), torch.tensor([[1, 1, 0], [0, 1, 1]]),
           torch.tensor([[0, 0, 1], [0, 0, 0]])]
# Tensor "v": sums [6, -4, 0, 4] -> + - - +; tau_uni = [4, -4, 0, 4]
V1 = torch.tensor([4.0, 0.0, 0.0, 0.0])
V2 = torch.tensor([0.0, -4.0, 0.0, 0.0])
V3 = torch.tensor([2.0, 0.0, 0.0, 4.0])
V_UNI = torch.tensor([4.0, -4.0, 0.0, 4.0])
V_MASKS = [torch.tensor([1, 0, 0, 0]), torch.tensor([0, 1, 0, 0]), torch.tensor([1, 0, 0, 1])]
# Rescalers, sum over tensors of per-tensor means ("z" is all zero and adds nothing):
#   task 1: (11/6 + 4/4) / (9/6 + 4/4)   = 17/15   (a global mean would give 15/13)
#   task 2: (13/6 + 4/4) / (10/6 + 4/4)  = 19/16
#   task 3: (5/6 + 6/4)  / (3/6 + 8/4)   = 14/15
LAMBDAS = {"a": 17 / 15, "b": 19 / 16, "c": 14 / 15}

BASE = {"w": torch.tensor([[10.0, 10.0, 10.0], [-1.0, -1.0, -1.0]]),
        "v": torch.tensor([1.0, 2.0, 3.0, 4.0]), "z": torch.tensor([0.5, -0.5]),
        "ids": torch.arange(3)}


def expert(w: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": BASE["w"] + w, "v": BASE["v"] + v, "z": BASE["z"].clone(),
            "ids": torch.arange(3)}


EXPERTS = {"a": expert(W1, V1), "b": expert(W2, V2), "c": expert(W3, V3)}


def test_registration() -> None:
    m = METHODS.get("emr")
    assert m.task_specific and m.space == "delta" and m.requires_base
    assert m.params == () and m.model_params == () and m.sparsifier is None


def test_elect_mask_unify_one_tensor() -> None:
    out = emr_merge(BASE["w"], [W1, W2, W3], [1.0, 1.0, 1.0])
    assert torch.equal(out.merged, BASE["w"] + W_UNI)
    for got, want in zip(out.modulators.masks, W_MASKS, strict=True):
        assert got.dtype == torch.bool and torch.equal(got, want.bool())
    assert out.modulators.abs_means == [11 / 6, 13 / 6, 5 / 6]


def test_exact_values_three_tasks() -> None:
    before = [{n: t.clone() for n, t in sd.items()} for sd in (BASE, *EXPERTS.values())]
    models = merge_task_state_dicts(BASE, EXPERTS)
    assert models.tasks == ["a", "b", "c"] and list(models) == ["a", "b", "c"]
    assert models.rescalers == pytest.approx(LAMBDAS, rel=1e-15)
    # 3 tasks x (1 byte each for w, v, z) + 3 float64 rescalers + 32-byte sha256 digests of
    # the header, the rescalers and per tensor its base, unified tensor and 3 masks
    assert models.modulator_bytes == 9 + 24 + (2 + 3 * (2 + 3)) * 32
    assert torch.equal(models.unified["w"], BASE["w"] + W_UNI)
    assert torch.equal(models.unified["v"], BASE["v"] + V_UNI)
    assert torch.equal(models.unified["z"], BASE["z"])
    assert torch.equal(models.unified["ids"], torch.arange(3))
    for i, task in enumerate("abc"):
        sd = models[task]
        lam = models.rescalers[task]
        assert torch.equal(sd["w"], BASE["w"] + (W_UNI * W_MASKS[i]) * lam)
        assert torch.equal(sd["v"], BASE["v"] + (V_UNI * V_MASKS[i]) * lam)
        assert torch.equal(sd["z"], BASE["z"]) and torch.equal(sd["ids"], torch.arange(3))
        want = BASE["w"].double() + W_UNI.double() * W_MASKS[i] * LAMBDAS[task]
        assert torch.allclose(sd["w"].double(), want, rtol=1e-6, atol=0)
    for old, sd in zip(before, (BASE, *EXPERTS.values()), strict=True):  # inputs untouched
        assert all(torch.equal(old[n], sd[n]) for n in sd)


def test_rescalers_follow_the_official_algorithm_on_random_vectors() -> None:
    """An independent transcription of the official emr_merge (sum of per-tensor means)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 5), "b": (5,), "c": (3, 4, 2)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    deltas = [{n: torch.randn(s, generator=g) * (0.5 + k) for n, s in shapes.items()}
              for k in range(4)]
    models = merge_task_state_dicts(base, {f"t{k}": {n: base[n] + d[n] for n in shapes}
                                           for k, d in enumerate(deltas)})
    taus = [{n: (base[n] + d[n]) - base[n] for n in shapes} for d in deltas]  # as stored
    scales, new_scales = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for n in shapes:
        flag = (torch.stack([t[n] for t in taus]).sum(0) > 0) * 2 - 1
        masks = [(t[n] * flag) > 0 for t in taus]
        uni = torch.stack([(m * t[n]).abs() for m, t in zip(masks, taus, strict=True)]).amax(0) * flag
        tau_uni = (base[n] + uni) - base[n]
        assert torch.equal(models.unified[n], base[n] + uni)
        for k in range(4):
            scales[k] += taus[k][n].double().abs().mean()
            new_scales[k] += (tau_uni * masks[k]).double().abs().mean()
    assert list(models.rescalers.values()) == pytest.approx((scales / new_scales).tolist(),
                                                            rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_ties_and_zeros_match_the_official_rule(k: int, seed: int) -> None:
    """Small integer task vectors (many exact-0 sums and zero entries) against the official
    per-entry rule: flag = (sum > 0) * 2 - 1, M_t = tau_t * flag > 0, max over agreeing."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randint(-3, 4, (3, 5), generator=g).float(), "b": torch.zeros(4)}
    taus = [{n: torch.randint(-2, 3, t.shape, generator=g).float() for n, t in base.items()}
            for _ in range(k)]
    models = merge_task_state_dicts(base, {f"t{i}": {n: base[n] + d[n] for n in base}
                                           for i, d in enumerate(taus)})
    num, den = [0.0] * k, [0.0] * k
    for n in base:
        flag = (sum(d[n] for d in taus) > 0) * 2 - 1
        masks = [d[n] * flag > 0 for d in taus]
        uni = torch.stack([(m * d[n]).abs() for m, d in zip(masks, taus, strict=True)]).amax(0)
        assert torch.equal(models.unified[n], base[n] + uni * flag)
        for i in range(k):
            assert torch.equal(models.modulators.mask(i, n), masks[i])
            num[i] += float(taus[i][n].abs().double().mean())
            den[i] += float((uni * masks[i]).double().mean())
    want = [a / b if b > 0 else 1.0 for a, b in zip(num, den, strict=True)]
    assert list(models.rescalers.values()) == pytest.approx(want, rel=1e-12)


def test_task_with_nothing_kept_gets_rescaler_one_and_the_base() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    experts = {"up": {"w": torch.tensor([2.0, 2.0])}, "down": {"w": torch.tensor([-1.0, 2.0])}}
    models = merge_task_state_dicts(base, experts)  # sum [1 - 3, 0] -> -, -: "up" loses
    assert models.rescalers == {"up": 1.0, "down": 1.0}
    assert torch.equal(models["up"]["w"], base["w"])
    assert torch.equal(models["down"]["w"], torch.tensor([-1.0, 2.0]))


def test_single_task_reproduces_the_expert() -> None:
    models = merge_task_state_dicts(BASE, {"a": EXPERTS["a"]})
    assert models.rescalers == {"a": 1.0}
    for name, tensor in models["a"].items():
        assert torch.equal(tensor, EXPERTS["a"][name]), name


def test_all_zero_task_vectors_give_the_base_and_empty_masks() -> None:
    models = merge_task_state_dicts(BASE, {"a": dict(BASE), "b": dict(BASE)})
    assert models.rescalers == {"a": 1.0, "b": 1.0}
    for task in models:
        assert all(torch.equal(models[task][n], BASE[n]) for n in BASE)
        assert not models.modulators.mask(models.tasks.index(task), "w").any()


def test_load_into_a_torch_module() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "xy"}
    models = merge_task_state_dicts(base, experts)
    models.load_into(net, "y")
    for k, v in net.state_dict().items():
        assert torch.equal(v, models["y"][k])


def test_single_merged_model_is_refused_with_a_pointer() -> None:
    with pytest.raises(RecipeError) as exc:
        merge_state_dicts(BASE, EXPERTS, "emr")
    msg = str(exc.value)
    assert "one model per task" in msg and "a, b, c" in msg
    assert "merge_task_state_dicts" in msg and "mergewise materialize" in msg
    sd = merge_state_dicts(BASE, EXPERTS, "emr", task="b")
    assert all(torch.equal(sd[n], t) for n, t in merge_task_state_dicts(BASE, EXPERTS)["b"].items())


def test_task_argument_and_task_api_need_a_task_specific_method() -> None:
    with pytest.raises(RecipeError, match="task='a' applies to task-specific methods"):
        merge_state_dicts(BASE, EXPERTS, "ties", task="a")
    with pytest.raises(RecipeError, match="ties yields a single merged model.*emr"):
        merge_task_state_dicts(BASE, EXPERTS, "ties")


def test_unknown_task_lists_the_known_ones() -> None:
    models = merge_task_state_dicts(BASE, EXPERTS)
    with pytest.raises(UnknownTaskError, match="no task 'd'; known tasks: a, b, c"):
        models["d"]
    with pytest.raises(UnknownTaskError, match="merge_state_dicts: no task 'd'; known tasks: a"):
        merge_state_dicts(BASE, EXPERTS, "emr", task="d")
    assert "d" not in models and "a" in models


def test_recipe_rules() -> None:
    base = {"merge_method": "emr", "base_model": "b"}
    with pytest.raises(RecipeError, match="task name 'x' is also models.0's"):
        parse_recipe({**base, "models": [{"model": "p/x"}, {"model": "q/x"}]})
    parse_recipe({**base, "models": [{"model": "p/x"}, {"model": "q/x", "name": "y"}]})
    with pytest.raises(RecipeError, match="unknown parameter 'weight' for emr"):
        parse_recipe({**base, "models": ["p/x"], "parameters": {"weight": 2.0}})
    with pytest.raises(RecipeError, match="emr needs base_model"):
        parse_recipe({"merge_method": "emr", "models": ["p/x"]})


def test_sparsify_block_runs_before_the_election() -> None:
    sparsify = {"method": "magnitude", "density": 0.5}
    models = merge_task_state_dicts(BASE, EXPERTS, sparsify=sparsify)
    # magnitude 0.5 keeps the 3 largest |tau| of "w" (ties by index) and 2 of "v"
    kept = {t: {n: magnitude(EXPERTS[t][n] - BASE[n], density=0.5, generator=None, stats=None)
                for n in ("w", "v")} for t in "abc"}
    trimmed = {t: {**EXPERTS[t], **{n: BASE[n] + kept[t][n] for n in kept[t]}} for t in "abc"}
    want = merge_task_state_dicts(BASE, trimmed)
    assert models.rescalers == want.rescalers
    for t in "abc":
        assert all(torch.equal(models[t][n], want[t][n]) for n in BASE)


# --- bit packing -----------------------------------------------------------------------------

def test_bit_order_is_little_endian_within_a_byte() -> None:
    mask = torch.tensor([True] + [False] * 8 + [True])  # entries 0 and 9
    assert pack_mask(mask).tolist() == [0b00000001, 0b00000010]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=3), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(shape: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    assert np.array_equal(np.unpackbits(packed.numpy(), bitorder="little")[:mask.numel()],
                          mask.reshape(-1).numpy())


def test_unpack_refuses_wrong_length_and_set_padding_bits() -> None:
    with pytest.raises(ModulatorError, match=r"expected uint8 \[2\].*got uint8 \[1\]"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), (3, 3))
    with pytest.raises(ModulatorError, match="padding bits are set"):
        unpack_mask(torch.tensor([0, 0b10], dtype=torch.uint8), (3, 3))
