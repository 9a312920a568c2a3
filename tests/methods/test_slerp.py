"""SLERP between two models: hand-computed angles, colinear/zero fallback to lerp, endpoints."""

from __future__ import annotations

import math

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.slerp import slerp

S2 = math.sqrt(2.0)
S3 = math.sqrt(3.0)


def _close(out: torch.Tensor, expected: list, dtype: torch.dtype = torch.float32) -> None:
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), rtol=tol, atol=tol)


def test_registration() -> None:
    m = METHODS.get("slerp")
    assert m.space == "weight"
    assert (m.min_models, m.max_models) == (2, 2)
    assert not m.accepts_sparsify


def test_orthogonal_unit_vectors() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # Omega = pi/2, sin Omega = 1: (sin((1-t) pi/2), sin(t pi/2))
    _close(slerp(None, [a, b], [], t=0.5), [S2 / 2, S2 / 2])
    _close(slerp(None, [a, b], [], t=1 / 3), [S3 / 2, 0.5])  # sin(pi/3), sin(pi/6)


def test_orthogonal_different_norms() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    # the angle uses normalised copies; the coefficients apply to the raw tensors
    _close(slerp(None, [a, b], [], t=0.5), [S2 / 2, 3 * S2 / 2])


def test_sixty_degrees_2x2() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # a.b = 2 + 0 + 0 + 1 = 3, |a| = |b| = sqrt 6: cos = 1/2, Omega = pi/3, sin Omega = sqrt3/2
    # t = 1/2: both coefficients sin(pi/6) / (sqrt3/2) = 1/sqrt3 -> (a + b) / sqrt3
    _close(slerp(None, [a, b], [], t=0.5), [[3 / S3, 2 / S3], [1 / S3, 2 / S3]], torch.float64)
    # t = 1/4: sin(pi/4) / (sqrt3/2) = sqrt(2/3); sin(pi/12) / (sqrt3/2) = (sqrt6 - sqrt2) / (2 sqrt3)
    ca = math.sqrt(2 / 3)
    cb = (math.sqrt(6) - S2) / (2 * S3)
    _close(slerp(None, [a, b], [], t=0.25),
           [[ca + 2 * cb, 2 * ca], [cb, ca + cb]], torch.float64)


def test_unit_circle_stays_on_circle() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, S3 / 2])  # 60 degrees apart
    # t = 1/2 lands at 30 degrees: (cos 30, sin 30); lerp would have norm cos 30 < 1
    _close(slerp(None, [a, b], [], t=0.5), [S3 / 2, 0.5])


def test_endpoints_exact() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert torch.equal(slerp(None, [a, b], [], t=0.0), a)
    assert torch.equal(slerp(None, [a, b], [], t=1.0), b)


def test_colinear_falls_back_to_lerp() -> None:
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])
    # cos = 1: (1 - t) a + t b = a + t (b - a)
    assert torch.equal(slerp(None, [a, b], [], t=0.25), torch.tensor([1.25, 2.5, 3.75]))
    assert torch.equal(slerp(None, [a, b], [], t=0.0), a)
    assert torch.equal(slerp(None, [a, b], [], t=1.0), b)


def test_anti_colinear_falls_back_to_lerp() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])  # cos = -1
    assert torch.equal(slerp(None, [a, b], [], t=0.5), torch.tensor([-0.5, -1.0]))


def test_nearly_colinear_threshold() -> None:
    a = torch.tensor([1.0, 0.0])
    # cos = 1 / sqrt(1.0001) = 0.99995 > 0.9995 -> lerp: (1, 0.005)
    near = slerp(None, [a, torch.tensor([1.0, 0.01])], [], t=0.5)
    torch.testing.assert_close(near, torch.tensor([1.0, 0.005]), rtol=0, atol=1e-7)
    # cos = 1 / sqrt(1.0016) = 0.9992 < 0.9995 -> slerp. With equal norms the midpoint is the
    # normalised lerp: b = (1, 0.04) scaled to norm 1 -> (cos w, sin w), w = atan 0.04;
    # slerp at 1/2 -> (cos w/2, sin w/2)
    w = math.atan(0.04)
    b = torch.tensor([math.cos(w), math.sin(w)], dtype=torch.float64)
    far = slerp(None, [a.double(), b], [], t=0.5)
    _close(far, [math.cos(w / 2), math.sin(w / 2)], torch.float64)


def test_zero_tensor_sits_at_ninety_degrees() -> None:
    """mergekit: a zero norm counts as 1, so the cosine is 0 and theta = pi/2: the non-zero end
    is scaled by sin(t pi/2) (or sin((1-t) pi/2)), not by t as a lerp would."""
    z, b = torch.zeros(2), torch.tensor([2.0, 4.0])
    half = torch.sin(torch.tensor(0.5) * torch.acos(torch.tensor(0.0)))  # float32, as computed
    assert torch.equal(slerp(None, [z, b], [], t=0.5), half * b)
    quarter = torch.sin((1 - torch.tensor(0.25)) * torch.acos(torch.tensor(0.0)))
    assert torch.equal(slerp(None, [b, z], [], t=0.25), quarter * b)
    assert torch.equal(slerp(None, [z, z], [], t=0.5), torch.zeros(2))


def test_one_element() -> None:
    # 1-element tensors are always (anti)colinear: lerp
    assert torch.equal(slerp(None, [torch.tensor([2.0]), torch.tensor([3.0])], [], t=0.5),
                       torch.tensor([2.5]))
    assert torch.equal(slerp(None, [torch.tensor([2.0]), torch.tensor([-2.0])], [], t=0.5),
                       torch.tensor([0.0]))


# --- through the public API --------------------------------------------------------------------

A = {"w": torch.tensor([1.0, 0.0]), "ids": torch.tensor([1, 2])}
B = {"w": torch.tensor([0.0, 1.0]), "ids": torch.tensor([3, 4])}


def test_api_two_models() -> None:
    out = merge_state_dicts(None, [A, B], "slerp", parameters={"t": 1 / 3})
    _close(out["w"], [S3 / 2, 0.5])
    assert torch.equal(out["ids"], A["ids"])  # integer buffers from the first model


def test_api_base_is_first_endpoint_with_one_model() -> None:
    out = merge_state_dicts(A, [B], "slerp", parameters={"t": 0.0})
    assert torch.equal(out["w"], A["w"])
    out = merge_state_dicts(A, [B], "slerp", parameters={"t": 1.0})
    assert torch.equal(out["w"], B["w"])
    out = merge_state_dicts(A, [B], "slerp")  # default t = 0.5
    _close(out["w"], [S2 / 2, S2 / 2])


def test_api_base_ignored_with_two_models() -> None:
    base = {"w": torch.tensor([5.0, 5.0]), "ids": torch.tensor([9, 9])}
    out = merge_state_dicts(base, [A, B], "slerp", parameters={"t": 0.0})
    assert torch.equal(out["w"], A["w"])
    assert torch.equal(out["ids"], base["ids"])


def test_api_t_per_tensor_filter() -> None:
    a = {"attn.w": torch.tensor([1.0, 0.0]), "mlp.w": torch.tensor([1.0, 2.0])}
    b = {"attn.w": torch.tensor([0.0, 1.0]), "mlp.w": torch.tensor([3.0, 6.0])}
    out = merge_state_dicts(None, [a, b], "slerp",
                            parameters={"t": [{"glob": "attn.*", "value": 1.0},
                                              {"value": 0.25}]})
    assert torch.equal(out["attn.w"], b["attn.w"])
    assert torch.equal(out["mlp.w"], torch.tensor([1.5, 3.0]))  # colinear: lerp at 1/4


def test_api_bf16_and_float64() -> None:
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([0.0, 1.0], dtype=torch.bfloat16)}
    out = merge_state_dicts(None, [a, b], "slerp", parameters={"t": 0.5})
    assert out["w"].dtype == torch.bfloat16
    # sqrt(2)/2 = 0.70710678 rounds to bf16 0.70703125
    assert torch.equal(out["w"], torch.tensor([S2 / 2, S2 / 2]).bfloat16())
    out = merge_state_dicts(None, [{"w": a["w"].double()}, {"w": b["w"].double()}], "slerp",
                            parameters={"t": 0.5}, dtype="float64")
    assert out["w"].dtype == torch.float64
    _close(out["w"], [S2 / 2, S2 / 2], torch.float64)


def test_api_needs_exactly_two() -> None:
    with pytest.raises(RecipeError, match="exactly 2"):
        merge_state_dicts(None, [A, B, A], "slerp")
    with pytest.raises(RecipeError, match="exactly 2"):
        merge_state_dicts(None, [A], "slerp")
