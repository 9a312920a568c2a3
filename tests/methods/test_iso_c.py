"""Iso-C: per matrix, the sum of the task vectors with every singular value replaced by their
mean (s̄ U Vᵀ); other tensors the mean; times lambda."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import Family
from hypothesis import given, settings
from hypothesis import strategies as st
from svd_helpers import F64, merged_twice, t64, weight_and_bias
from value_helpers import assert_values

from mergewise import METHODS, merge_state_dicts
from mergewise.docs import methods_markdown
from mergewise.methods.iso_c import iso_c_merge


def reference(taus: list[np.ndarray]) -> np.ndarray:
    """s̄ polar(Σ) in numpy float64, polar(a) = a (aᵀa)^(-1/2) (eigh: independent of the SVD);
    for a wide sum, the transpose's."""
    total = sum(taus)
    s_bar = np.linalg.svd(total, compute_uv=False).mean()
    a = total if total.shape[0] >= total.shape[1] else total.T
    w, q = np.linalg.eigh(a.T @ a)
    p = a @ (q / np.sqrt(w)) @ q.T
    return s_bar * (p if a is total else p.T)


def merge(taus, base=None, **params) -> torch.Tensor:
    base = torch.zeros_like(taus[0]) if base is None else base
    return iso_c_merge(base, taus, [1.0] * len(taus), **params)


def test_registration() -> None:
    m = METHODS.get("iso_c")
    assert m.func is iso_c_merge and m.space == "delta" and m.requires_base
    assert [(p.name, p.default) for p in m.params] == [("lambda", 1.0), ("decompose", True)]
    assert [p.name for p in m.model_params] == ["weight"]
    assert m.accepts_sparsify and m.sparsifier is None and not m.elementwise
    doc = methods_markdown()
    section = doc[doc.index("## `iso_c`"):]
    assert "`sparsify:` block: accepted" in section[:section.index("\n## ", 3)]


# --- exact values -----------------------------------------------------------------------------

def test_signs_are_kept() -> None:
    # Σ = diag(3, -1): singular values 3, 1 -> s̄ = 2; U Vᵀ = diag(1, -1)
    out = merge([t64([[2.0, 0.0], [0.0, 0.0]]), t64([[1.0, 0.0], [0.0, -1.0]])])
    assert_values(out, [[2.0, 0.0], [0.0, -2.0]])


def test_rectangular() -> None:
    # Σ = [[1, 0, 0], [0, 3, 0]]: s̄ = 2 -> [[2, 0, 0], [0, 2, 0]]
    out = merge([t64([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), t64([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])])
    assert_values(out, [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])


def test_orthogonal_tasks() -> None:
    # diag(3, 0, 1, 0) + diag(0, 2, 0.4, 0.5) = diag(3, 2, 1.4, 0.5): s̄ = 6.9 / 4 = 1.725
    out = merge([torch.diag(t64([3.0, 0.0, 1.0, 0.0])), torch.diag(t64([0.0, 2.0, 0.4, 0.5]))])
    assert_values(out, 1.725 * torch.eye(4, dtype=F64))


def test_rank_one_column() -> None:
    # a 3 x 1 matrix: one singular value |Σ|, U Vᵀ = Σ / |Σ|: the sum itself
    taus = [t64([[1.0], [2.0], [-2.0]]), t64([[0.5], [0.0], [1.0]])]
    assert_values(merge(taus), taus[0] + taus[1])


@pytest.mark.parametrize(("shape", "k_tasks"), [((3, 2), 2), ((4, 3), 3), ((2, 5), 2)])
def test_hand_made_matrices_match_numpy(shape: tuple[int, int], k_tasks: int) -> None:
    rng = np.random.default_rng(7 * sum(shape) + k_tasks)
    taus = [rng.integers(-4, 5, size=shape).astype(np.float64) for _ in range(k_tasks)]
    base = t64(np.full(shape, 0.5))
    out = iso_c_merge(base, [torch.from_numpy(t) for t in taus], [1.0] * k_tasks, lam=1.5)
    assert_values(out, base + 1.5 * torch.from_numpy(reference(taus)), tol=1e-10)


def test_explicit_2x2() -> None:
    # Σ = [[2, 1], [1, 2]]: eigen/singular values 3 and 1, s̄ = 2; symmetric positive: U Vᵀ = I
    assert_values(merge([t64([[1.0, 1.0], [0.0, 1.0]]), t64([[1.0, 0.0], [1.0, 1.0]])]),
                  2 * torch.eye(2, dtype=F64))
    # Σ = [[0, 2], [1, 0]]: singular values 2, 1 -> s̄ = 1.5; polar = [[0, 1], [1, 0]]
    assert_values(merge([t64([[0.0, 2.0], [0.0, 0.0]]), t64([[0.0, 0.0], [1.0, 0.0]])]),
                  [[0.0, 1.5], [1.5, 0.0]])


def test_rank_deficient_sum_leaves_null_directions_out() -> None:
    # Σ = diag(3, 0): s̄ = (3 + 0) / 2 = 1.5; the official code gives 1.5 U Vᵀ with LAPACK's
    # arbitrary pair for the zero singular value (1.5 I, or 1.5 diag(1, -1)); here only e1 e1ᵀ
    out = merge([t64([[1.0, 0.0], [0.0, 0.0]]), t64([[2.0, 0.0], [0.0, 0.0]])])
    assert_values(out, [[1.5, 0.0], [0.0, 0.0]])
    # rank 1 of 3 in a 4 x 3: s̄ = |Σ|_2 / 3 on the one direction
    u, v = t64([1.0, 2.0, 2.0, 0.0]) / 3, t64([0.0, 0.6, 0.8])
    out = merge([2 * torch.outer(u, v), 4 * torch.outer(u, v)])
    assert_values(out, 2.0 * torch.outer(u, v))
    # float32 and float64 agree (the null direction's float32 noise is dropped, not amplified)
    taus = [torch.outer(u, v), torch.outer(t64([0.0, 0.0, 0.0, 1.0]), t64([1.0, 0.0, 0.0]))]
    torch.testing.assert_close(merge([t.float() for t in taus]).double(), merge(taus),
                               rtol=1e-6, atol=1e-6)


def test_non_matrices_take_the_mean_times_lambda() -> None:
    base = t64([1.0, 0.0])
    out = iso_c_merge(base, [t64([1.0, 2.0]), t64([3.0, -4.0])], [1.0, 1.0], lam=2.0)
    assert_values(out, [1.0 + 2 * 2.0, 2 * -1.0])
    mats = [t64([[0.0, 2.0], [0.0, 0.0]]), t64([[0.0, 0.0], [1.0, 0.0]])]
    assert_values(merge(mats, decompose=False), [[0.0, 1.0], [0.5, 0.0]])
    kernel = [torch.ones(2, 1, 3, dtype=F64), 3 * torch.ones(2, 1, 3, dtype=F64)]
    assert_values(iso_c_merge(torch.zeros(2, 1, 3, dtype=F64), kernel, [1.0, 1.0]),
                  2 * torch.ones(2, 1, 3, dtype=F64))


def test_weights_scale_before_the_sum() -> None:
    a, b = t64([[2.0, 0.0], [0.0, 0.0]]), t64([[1.0, 0.0], [0.0, -1.0]])
    out = iso_c_merge(torch.zeros(2, 2, dtype=F64), [a, b], [0.5, 3.0])
    assert_values(out, torch.from_numpy(reference([0.5 * a.numpy(), 3.0 * b.numpy()])))


# --- invariants -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


def _taus(seed: int, shape: tuple[int, int], count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(count)]


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_singular_values_all_equal_their_mean(shape, count, seed) -> None:
    taus = _taus(seed, shape, count)
    out = merge(taus)
    assert out.shape == shape and out.dtype == F64
    s = torch.linalg.svdvals(out)
    s_bar = torch.linalg.svdvals(sum(taus)).mean()
    assert_values(s, s_bar.expand(min(shape)), tol=1e-9)
    # the singular vectors are the sum's: out (s̄ U Vᵀ) and the sum share their polar factor
    assert_values(out @ sum(taus).T, (out @ sum(taus).T).T, tol=1e-9)  # s̄ U S Uᵀ: symmetric


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(2, 4), st.integers(0, 2**31 - 1), st.floats(0.1, 10))
def test_order_invariance_and_homogeneity(shape, count, seed, scale) -> None:
    taus = _taus(seed, shape, count)
    out = merge(taus)
    assert_values(merge(taus[::-1]), out, tol=1e-9)
    assert_values(merge([scale * t for t in taus]), scale * out, tol=1e-9 * max(1.0, scale))
    assert_values(merge([-t for t in taus]), -out, tol=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), shapes,
       st.integers(0, 2**31 - 1))
def test_dtypes(dtype, shape, seed) -> None:
    taus = _taus(seed, shape, 2)
    out = iso_c_merge(torch.zeros(shape, dtype=dtype), [t.to(dtype) for t in taus], [1.0, 1.0])
    assert out.dtype == dtype and out.shape == shape
    exact = merge([t.to(dtype).double() for t in taus])
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


# --- through the engine -----------------------------------------------------------------------

def _sds(seed: int = 0):
    return weight_and_bias(5, 3, 3, seed)


def test_api_float32_matches_float64() -> None:
    base, models = _sds()
    out = merge_state_dicts(base, models, "iso_c", parameters={"lambda": 1.5})
    ref = merge_state_dicts({k: v.double() for k, v in base.items()},
                            [{k: v.double() for k, v in m.items()} for m in models], "iso_c",
                            parameters={"lambda": 1.5}, dtype="float64")
    for k in base:
        assert out[k].dtype == torch.float32
        torch.testing.assert_close(out[k].double(), ref[k], rtol=1e-5, atol=1e-5)
    taus = [(m["w"].double() - base["w"].double()).numpy() for m in models]
    assert_values(ref["w"], base["w"].double() + 1.5 * torch.from_numpy(reference(taus)),
                  tol=1e-10)
    b = [m["b"].double() - base["b"].double() for m in models]
    assert_values(ref["b"], base["b"].double() + 1.5 * sum(b) / 3, tol=1e-12)


def test_api_with_a_tadrop_block() -> None:
    base, models = _sds(2)
    block = {"method": "tadrop", "drop_rate": 0.5}
    out = merge_state_dicts(base, models, "iso_c", sparsify=block)
    sparse = [{k: v - base[k] for k, v in merge_state_dicts(base, [m], "task_arithmetic",
                                                            sparsify=block).items()}
              for m in models]
    assert all(int((s["w"] == 0).sum()) >= 5 for s in sparse)
    for k in base:
        want = iso_c_merge(base[k], [s[k] for s in sparse], [1.0] * 3)
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merge_state_dicts(base, models, "iso_c")["w"], out["w"])


def test_cli_merge_on_the_tiny_family(family_f32: Family, tmp_path: Path) -> None:
    out, base, experts = merged_twice(family_f32, "iso_c", {"lambda": 1.3}, tmp_path)
    for k, v in out.items():
        want = iso_c_merge(base[k].double(),
                           [e[k].double() - base[k].double() for e in experts], [1.0, 1.0],
                           lam=1.3)
        torch.testing.assert_close(v.double(), want, rtol=1e-4, atol=1e-5)
        if v.dim() == 2 and not torch.equal(v, base[k]):
            # isotropic: every singular value that is not numerically zero is the same (the
            # embedding sum has a null direction: rows no expert changed)
            s = torch.linalg.svdvals(v.double() - base[k].double())
            s = s[s > 1e-5 * s.max()]
            assert float(s.max() - s.min()) <= 1e-5 * float(s.max()), k
    assert math.isfinite(sum(float(v.abs().sum()) for v in out.values()))
