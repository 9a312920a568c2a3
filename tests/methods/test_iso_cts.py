"""Iso-CTS: the sum's top-c directions plus each task's top-n directions outside them, both
stacks orthogonalised, one common singular value (the mean of the r slots); times lambda."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import Family
from hypothesis import given, settings
from hypothesis import strategies as st
from svd_helpers import F64, inv_sqrt_polar, merged_twice, t64, weight_and_bias
from value_helpers import assert_values

from mergewise import METHODS, merge_state_dicts
from mergewise.docs import methods_markdown
from mergewise.methods.iso_c import iso_c_merge
from mergewise.methods.iso_cts import iso_cts_merge, split_ranks


def reference(taus: list[np.ndarray], fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS in numpy float64 in the official order (generic full-rank inputs)."""
    m, n = taus[0].shape
    r, k = min(m, n), len(taus)
    c0 = int(r * fraction)
    c = r - round((r - c0) / k) * k
    per = (r - c) // k
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [], [], []
    for tau in taus:
        ui, si, vhi = np.linalg.svd(tau - u[:, :c] @ u[:, :c].T @ tau, full_matrices=False)
        us.append(ui[:, :per])
        ss.append(si[:per])
        vs.append(vhi[:per].T)
    us.append(u[:, :c])
    ss.append(s[:c])
    vs.append(vh[:c].T)
    s_bar = np.concatenate(ss).mean()
    return s_bar * inv_sqrt_polar(np.hstack(us)) @ inv_sqrt_polar(np.hstack(vs)).T


def merge(taus, base=None, **params) -> torch.Tensor:
    base = torch.zeros_like(taus[0]) if base is None else base
    return iso_cts_merge(base, taus, [1.0] * len(taus), **params)


def test_registration() -> None:
    m = METHODS.get("iso_cts")
    assert m.func is iso_cts_merge and m.space == "delta" and m.requires_base
    assert [(p.name, p.default) for p in m.params] == [
        ("lambda", 1.0), ("common_space_fraction", 0.8), ("decompose", True)]
    assert [p.name for p in m.model_params] == ["weight"]
    assert m.accepts_sparsify and m.sparsifier is None and not m.elementwise
    doc = methods_markdown()
    section = doc[doc.index("## `iso_cts`"):]
    assert "`sparsify:` block: accepted" in section[:section.index("\n## ", 3)]


@pytest.mark.parametrize(("r", "k", "f", "want"), [
    (768, 8, 0.8, (616, 19)), (768, 14, 0.8, (614, 11)), (768, 20, 0.8, (608, 8)),
    (50, 8, 0.8, (42, 1)),
    # Python's round is half-to-even: round(0.5) = 0 -> no task-specific space (Iso-C)
    (4, 2, 0.8, (4, 0)), (2, 2, 0.5, (2, 0)), (10, 4, 0.8, (10, 0)),
    (4, 2, 0.5, (2, 1)), (1, 1, 0.8, (0, 1)), (1, 2, 0.8, (1, 0)),
    # round overshoots r (the official code fails): one block fewer
    (3, 2, 0.0, (1, 1)), (5, 4, 0.0, (1, 1)),
])
def test_split_ranks(r: int, k: int, f: float, want: tuple[int, int]) -> None:
    assert split_ranks(r, k, f) == want
    c, n = want
    assert c >= 0 and c + k * n == r


# --- exact values -----------------------------------------------------------------------------

def test_differs_from_iso_c_in_closed_form() -> None:
    # r = 4, K = 2, f = 0.5: c = 2, n = 1. Σ = diag(3, 2, 1.4, 0.5): common {e1, e2} (3, 2);
    # residuals diag(0, 0, 1, 0) -> (1, e3), diag(0, 0, 0.4, 0.5) -> (0.5, e4);
    # s̄ = (1 + 0.5 + 3 + 2) / 4 = 1.625, the stacks are orthonormal: 1.625 I
    taus = [torch.diag(t64([3.0, 0.0, 1.0, 0.0])), torch.diag(t64([0.0, 2.0, 0.4, 0.5]))]
    assert_values(merge(taus, common_space_fraction=0.5), 1.625 * torch.eye(4, dtype=F64))
    # Iso-C gives s̄ = 6.9 / 4 = 1.725
    assert_values(iso_c_merge(torch.zeros(4, 4, dtype=F64), taus, [1.0, 1.0]),
                  1.725 * torch.eye(4, dtype=F64))


def test_task_subspace_is_the_residual_not_the_task() -> None:
    # r = 2, K = 1, f = 0.5: c = 1, n = 1. tau = [[2, 1], [1, 2]]: Σ = tau, common = its top
    # (3, u = (1,1)/√2); residual = (I - u uᵀ) tau = 1 * w wᵀ (w = (1,-1)/√2): (1, w, w);
    # s̄ = 2, stacks [w, u] orthonormal: 2 (w wᵀ + u uᵀ) = 2 I
    assert_values(merge([t64([[2.0, 1.0], [1.0, 2.0]])], common_space_fraction=0.5),
                  2 * torch.eye(2, dtype=F64))


def test_explicit_4x3() -> None:
    # r = 3, K = 3, f = 0: c0 = 0, round(3 / 3) * 3 = 3 -> c = 0, n = 1: each task's top triple,
    # no common part: rank-1 tasks on orthogonal axes -> s̄ (sum of outer products), s̄ = 2
    e = torch.eye(4, dtype=F64)
    f = torch.eye(3, dtype=F64)
    taus = [1.0 * torch.outer(e[0], f[2]), 2.0 * torch.outer(e[3], f[0]),
            3.0 * torch.outer(e[1], f[1])]
    want = 2.0 * sum(torch.outer(a, b) for a, b in [(e[0], f[2]), (e[3], f[0]), (e[1], f[1])])
    assert_values(merge(taus, common_space_fraction=0.0), want)


@pytest.mark.parametrize(("shape", "k_tasks", "f"), [
    ((3, 2), 2, 0.5), ((4, 3), 3, 0.0), ((6, 4), 2, 0.5), ((5, 8), 2, 0.2), ((8, 8), 2, 0.8),
])
def test_hand_made_matrices_match_numpy(shape: tuple[int, int], k_tasks: int, f: float) -> None:
    rng = np.random.default_rng(11 * sum(shape) + k_tasks)
    taus = [rng.integers(-4, 5, size=shape).astype(np.float64) for _ in range(k_tasks)]
    base = t64(np.full(shape, -0.25))
    out = iso_cts_merge(base, [torch.from_numpy(t) for t in taus], [1.0] * k_tasks, lam=1.5,
                        common_space_fraction=f)
    assert_values(out, base + 1.5 * torch.from_numpy(reference(taus, f)), tol=1e-10)


def test_fraction_one_is_iso_c() -> None:
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(6, 4, generator=g, dtype=F64) for _ in range(3)]
    assert_values(merge(taus, common_space_fraction=1.0), iso_c_merge(
        torch.zeros(6, 4, dtype=F64), taus, [1.0] * 3), tol=1e-10)
    # r = 4, K = 2, f = 0.8 rounds to no task space: Iso-C as well
    assert_values(merge(taus[:2]), iso_c_merge(torch.zeros(6, 4, dtype=F64), taus[:2],
                                               [1.0] * 2), tol=1e-10)


def test_rank_deficient_sum_leaves_null_directions_out() -> None:
    # r = 2, K = 2, f = 0.5: c = 2, n = 0 (Iso-C). Σ = diag(3, 0): only e1 e1ᵀ, s̄ = 1.5
    taus = [t64([[1.0, 0.0], [0.0, 0.0]]), t64([[2.0, 0.0], [0.0, 0.0]])]
    assert_values(merge(taus, common_space_fraction=0.5), [[1.5, 0.0], [0.0, 0.0]])
    # 4 x 4, K = 2, f = 0.5 (c = 2, n = 1), Σ = diag(2, 0, 1, 0): common (2, e1), (1, e3);
    # both residuals are 0 (LAPACK's arbitrary vectors, left out): s̄ = (2 + 1 + 0 + 0) / 4
    # = 0.75 on e1 and e3 only
    taus = [torch.diag(t64([1.0, 0.0, 1.0, 0.0])), torch.diag(t64([1.0, 0.0, 0.0, 0.0]))]
    assert_values(merge(taus, common_space_fraction=0.5),
                  torch.diag(t64([0.75, 0.0, 0.75, 0.0])))


def test_dependent_stack_is_orthogonalised_over_its_rank() -> None:
    # 4 x 2, K = 2, f = 0: c = 0, n = 1 (each task's top triple, no common part).
    # tau1 = 1 u e1ᵀ, tau2 = 3 u e2ᵀ share u: the U stack [u, u] has rank 1, its polar factor
    # over that rank is u (1, 1) / √2; V stack [e1, e2]: s̄ = (1 + 3) / 2 = 2 ->
    # 2 u (1, 1) / √2 (the official result adds LAPACK's arbitrary p (1, -1) / √2, p ⊥ u)
    u = t64([1.0, 2.0, 0.0, 2.0]) / 3
    taus = [torch.outer(u, t64([1.0, 0.0])), torch.outer(u, t64([0.0, 3.0]))]
    assert_values(merge(taus, common_space_fraction=0.0),
                  2 * torch.outer(u, t64([1.0, 1.0])) / 2**0.5)


def test_non_matrices_and_weights() -> None:
    base = t64([0.0, 1.0])
    out = iso_cts_merge(base, [t64([1.0, 2.0]), t64([3.0, -4.0]), t64([2.0, 5.0])],
                        [1.0, 1.0, 1.0], lam=0.5)
    assert_values(out, [1.0, 1.5])
    mats = [t64([[1.0, 2.0], [0.0, 1.0]]), t64([[3.0, 0.0], [1.0, -1.0]])]
    assert_values(merge(mats, decompose=False), (mats[0] + mats[1]) / 2)
    g = torch.Generator().manual_seed(9)
    taus = [torch.randn(5, 4, generator=g, dtype=F64) for _ in range(2)]
    out = iso_cts_merge(torch.zeros(5, 4, dtype=F64), taus, [2.0, -0.5],
                        common_space_fraction=0.5)
    assert_values(out, torch.from_numpy(reference([2 * taus[0].numpy(), -0.5 * taus[1].numpy()],
                                                  0.5)), tol=1e-10)


# --- invariants -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 7), st.integers(1, 7))
fractions = st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0])


def _taus(seed: int, shape: tuple[int, int], count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(count)]


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 4), st.integers(0, 2**31 - 1), fractions)
def test_isotropic_spectrum(shape, count, seed, fraction) -> None:
    taus = _taus(seed, shape, count)
    out = merge(taus, common_space_fraction=fraction)
    assert out.shape == shape and out.dtype == F64
    s = torch.linalg.svdvals(out)
    assert_values(s, s[0].expand(min(shape)), tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(2, 4), st.integers(0, 2**31 - 1), fractions, st.floats(0.1, 10))
def test_order_invariance_and_homogeneity(shape, count, seed, fraction, scale) -> None:
    taus = _taus(seed, shape, count)
    out = merge(taus, common_space_fraction=fraction)
    assert_values(merge(taus[::-1], common_space_fraction=fraction), out, tol=1e-9)
    assert_values(merge([scale * t for t in taus], common_space_fraction=fraction), scale * out,
                  tol=1e-9 * max(1.0, scale))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), shapes,
       st.integers(0, 2**31 - 1))
def test_dtypes(dtype, shape, seed) -> None:
    taus = _taus(seed, shape, 2)
    out = iso_cts_merge(torch.zeros(shape, dtype=dtype), [t.to(dtype) for t in taus], [1.0, 1.0],
                        common_space_fraction=0.5)
    assert out.dtype == dtype and out.shape == shape
    exact = merge([t.to(dtype).double() for t in taus], common_space_fraction=0.5)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


# --- through the engine -----------------------------------------------------------------------

def _sds(seed: int = 0):
    return weight_and_bias(8, 6, 2, seed)


def test_api_float32_matches_float64() -> None:
    base, models = _sds()
    params = {"lambda": 1.5, "common_space_fraction": 0.5}
    out = merge_state_dicts(base, models, "iso_cts", parameters=params)
    ref = merge_state_dicts({k: v.double() for k, v in base.items()},
                            [{k: v.double() for k, v in m.items()} for m in models], "iso_cts",
                            parameters=params, dtype="float64")
    for k in base:
        assert out[k].dtype == torch.float32
        torch.testing.assert_close(out[k].double(), ref[k], rtol=1e-5, atol=1e-5)
    taus = [(m["w"].double() - base["w"].double()).numpy() for m in models]
    assert_values(ref["w"], base["w"].double() + 1.5 * torch.from_numpy(reference(taus, 0.5)),
                  tol=1e-10)


def test_api_with_a_tadrop_block() -> None:
    base, models = _sds(2)
    block = {"method": "tadrop", "drop_rate": 0.5}
    params = {"common_space_fraction": 0.5}
    out = merge_state_dicts(base, models, "iso_cts", parameters=params, sparsify=block)
    sparse = [{k: v - base[k] for k, v in merge_state_dicts(base, [m], "task_arithmetic",
                                                            sparsify=block).items()}
              for m in models]
    assert all(int((s["w"] == 0).sum()) >= 10 for s in sparse)  # adaptive rates
    for k in base:
        want = iso_cts_merge(base[k], [s[k] for s in sparse], [1.0, 1.0],
                             common_space_fraction=0.5)
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)
    plain = merge_state_dicts(base, models, "iso_cts", parameters=params)
    assert not torch.allclose(plain["w"], out["w"])


def test_cli_merge_on_the_tiny_family(family_f32: Family, tmp_path: Path) -> None:
    params = {"lambda": 1.5, "common_space_fraction": 0.5}
    out, base, experts = merged_twice(family_f32, "iso_cts", params, tmp_path)
    for k, v in out.items():
        want = iso_cts_merge(base[k].double(),
                             [e[k].double() - base[k].double() for e in experts], [1.0, 1.0],
                             lam=1.5, common_space_fraction=0.5)
        torch.testing.assert_close(v.double(), want, rtol=1e-4, atol=1e-5)
    matrices = [k for k in base if base[k].dim() == 2]
    assert any(not torch.equal(out[k], base[k]) for k in matrices)
