"""TSV-Merge: per matrix, each task's top 1/K singular triples, stacked, both stacks replaced by
their polar factor, tau = U⊥ diag(S) V⊥ᵀ; 1-D tensors the running mean; times lambda."""

from __future__ import annotations

import math
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
from mergewise.methods.tsv import polar, running_mean, tsv_merge


def reference(taus: list[np.ndarray], k: int | None = None) -> np.ndarray:
    """TSV in numpy float64, the official order (zero tail columns left out: they meet S = 0)."""
    r = min(taus[0].shape)
    k = r // len(taus) if k is None else k
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    return inv_sqrt_polar(u) @ np.diag(s) @ inv_sqrt_polar(v).T


def merge(taus, base=None, **params) -> torch.Tensor:
    base = torch.zeros_like(taus[0]) if base is None else base
    return tsv_merge(base, taus, [1.0] * len(taus), **params)


def test_registration() -> None:
    m = METHODS.get("tsv")
    assert m.func is tsv_merge and m.space == "delta" and m.requires_base
    assert [(p.name, p.default) for p in m.params] == [
        ("lambda", 1.0), ("rank_fraction", None), ("decompose", True)]
    assert [p.name for p in m.model_params] == ["weight"]
    assert m.accepts_sparsify and m.sparsifier is None and not m.elementwise
    doc = methods_markdown()
    section = doc[doc.index("## `tsv`"):]
    assert "`sparsify:` block: accepted" in section[:section.index("\n## ", 3)]


# --- exact values -----------------------------------------------------------------------------

def test_orthogonal_tops_give_their_sum() -> None:
    # K = 2, r = 2 -> k = 1: each task's top rank-1 part, orthogonal, so simply summed
    out = merge([torch.diag(t64([3.0, 1.0])), torch.diag(t64([0.5, 2.0]))])
    assert_values(out, torch.diag(t64([3.0, 2.0])))


def test_non_orthogonal_closed_form() -> None:
    # tau1 top: 3 e1 e1ᵀ; tau2 = [[1,1],[1,1]] top: 2 u uᵀ, u = (1,1)/√2. Both stacks are
    # [e1, u]; its polar factor P (the orthonormal pair symmetric about e1 and u) gives
    # tau = P diag(3, 2) Pᵀ = 2.5 I + (1 / (2√2)) [[1, -1], [-1, -1]]
    out = merge([torch.diag(t64([3.0, 1.0])), torch.ones(2, 2, dtype=F64)])
    c = 1 / (2 * math.sqrt(2))
    assert_values(out, [[2.5 + c, -c], [-c, 2.5 - c]])
    # cross-check with the inverse square root of the Gram: P = U (UᵀU)^(-1/2), tau = P S Pᵀ
    u = np.array([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    p = inv_sqrt_polar(u)
    assert_values(out, torch.from_numpy(p @ np.diag([3.0, 2.0]) @ p.T))


def test_rank_rounding_leaves_a_slot_empty() -> None:
    # 3 x 3, K = 2: k = int(3 * 0.5) = 1; the third slot stays empty
    out = merge([torch.diag(t64([3.0, 2.0, 1.0])), torch.diag(t64([0.1, 0.2, 5.0]))])
    assert_values(out, torch.diag(t64([3.0, 0.0, 5.0])))


def test_more_tasks_than_rank_keeps_the_base() -> None:
    base = t64([[1.0, 2.0], [3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(2, 2, generator=g, dtype=F64) for _ in range(3)]
    assert torch.equal(merge(taus, base), base)  # k = int(2 / 3) = 0


@pytest.mark.parametrize(("shape", "k_tasks"), [((3, 2), 2), ((4, 3), 3), ((2, 5), 2), ((6, 4), 2)])
def test_hand_made_matrices_match_numpy(shape: tuple[int, int], k_tasks: int) -> None:
    # small integer matrices (generic: full rank, distinct singular values)
    rng = np.random.default_rng(sum(shape) + k_tasks)
    taus = [rng.integers(-4, 5, size=shape).astype(np.float64) for _ in range(k_tasks)]
    base = t64(np.ones(shape))
    out = tsv_merge(base, [torch.from_numpy(t) for t in taus], [1.0] * k_tasks, lam=0.7)
    assert_values(out, base + 0.7 * torch.from_numpy(reference(taus)), tol=1e-10)


def test_explicit_3x2() -> None:
    # tau1 = [[2,0],[0,1],[0,0]]: top (2, e1, e1); tau2 = [[0,0],[0,0],[0,3]]: top (3, e3, e2).
    # Stacks [e1, e3] and [e1, e2] are orthonormal already: tau = 2 e1 e1ᵀ + 3 e3 e2ᵀ
    tau1 = t64([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    tau2 = t64([[0.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    assert_values(merge([tau1, tau2]), [[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])


def test_rank_one_orthogonal_tasks_give_task_arithmetic() -> None:
    # 4 x 3, rank-1 tasks with orthogonal left and right vectors: TSV = sum (k = 1 each)
    u1, u2 = t64([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2), t64([1.0, -1.0, 2.0, 0.0]) / math.sqrt(6)
    v1, v2 = t64([0.0, 3.0, 4.0]) / 5, t64([1.0, 0.0, 0.0])
    taus = [2.5 * torch.outer(u1, v1), -1.5 * torch.outer(u2, v2)]
    assert_values(merge(taus), taus[0] + taus[1])


def test_rank_fraction() -> None:
    # rank_fraction 1: every triple of both tasks (the official "lossless" variant): the stacks
    # have 2r = 6 columns > m = 5, their polar factors orthonormal rows; numpy's polar via SVD
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(5, 3, generator=g, dtype=F64) for _ in range(2)]
    out = merge(taus, rank_fraction=1.0)
    us, ss, vs = zip(*(np.linalg.svd(t.numpy(), full_matrices=False) for t in taus), strict=True)
    u, s, vh = np.hstack(us), np.concatenate(ss), np.vstack(vs)

    def svd_polar(a: np.ndarray) -> np.ndarray:
        p, _, qh = np.linalg.svd(a, full_matrices=False)
        return p @ qh

    assert_values(out, torch.from_numpy(svd_polar(u) @ np.diag(s) @ svd_polar(vh)), tol=1e-10)
    # rank_fraction 0.5 on r = 3 with K = 3: k = 1 (the default would be int(3 / 3) = 1 too)
    three = [*taus, torch.randn(5, 3, generator=g, dtype=F64)]
    assert_values(merge(three, rank_fraction=0.5),
                  torch.from_numpy(reference([t.numpy() for t in three], k=1)), tol=1e-10)
    # a fraction that floors to 0 keeps the base
    assert torch.equal(merge(taus, rank_fraction=0.3), torch.zeros(5, 3, dtype=F64))


def test_zero_task_vector_leaves_its_slots_empty() -> None:
    # the official code stacks LAPACK's arbitrary singular vectors of the zero matrix and gets
    # [[1.5, -1.5], [-1.5, 1.5]]; here task 2's slot is empty: task 1's top part, in any order
    tau1, zero = torch.diag(t64([3.0, 1.0])), torch.zeros(2, 2, dtype=F64)
    assert_values(merge([tau1, zero]), torch.diag(t64([3.0, 0.0])))
    assert_values(merge([zero, tau1]), torch.diag(t64([3.0, 0.0])))
    # a rank-1 task with k = 2 (rank_fraction 2/3 of r = 3): its second slot is empty; task 2's
    # triples (1, e1, e1), (0.5, e3, e2) are orthogonal to task 1's (2, e2, e3): the sum
    low = torch.outer(t64([0.0, 1.0, 0.0]), t64([0.0, 0.0, 2.0]))
    other = t64([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    assert_values(merge([low, other], rank_fraction=2 / 3), low + other)


def test_identical_tasks_give_their_truncation() -> None:
    # the stacks [U_k, U_k] are rank k: no unique polar factor (the official result is LAPACK's
    # choice); over the stack's rank it is U_k [I I] / √2, and tau = U_k (S_k + S_k) / 2 V_kᵀ
    g = torch.Generator().manual_seed(4)
    tau = torch.randn(5, 4, generator=g, dtype=F64)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    assert_values(merge([tau, tau]), (u[:, :2] * s[:2]) @ vh[:2], tol=1e-10)
    # polar of a rank-deficient matrix: the partial isometry, P_1 Q_1ᵀ
    a = t64([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert_values(polar(a), [[2**-0.5, 2**-0.5], [0.0, 0.0], [0.0, 0.0]])


def test_one_d_tensors_take_the_running_mean_times_lambda() -> None:
    base = t64([1.0, -1.0, 0.5])
    taus = [t64([1.0, 2.0, 3.0]), t64([3.0, 0.0, -3.0]), t64([2.0, 1.0, 0.0])]
    out = tsv_merge(base, taus, [1.0, 1.0, 1.0], lam=0.5)
    assert_values(out, base + 0.5 * t64([2.0, 1.0, 0.0]))
    # conv kernels (4-D) and decompose: false matrices too
    kernel = [torch.full((2, 1, 2, 2), 2.0, dtype=F64), torch.full((2, 1, 2, 2), 4.0, dtype=F64)]
    assert_values(tsv_merge(torch.zeros(2, 1, 2, 2, dtype=F64), kernel, [1.0, 1.0]),
                  torch.full((2, 1, 2, 2), 3.0, dtype=F64))
    mats = [torch.diag(t64([3.0, 1.0])), torch.ones(2, 2, dtype=F64)]
    assert_values(merge(mats, decompose=False), (mats[0] + mats[1]) / 2)


def test_running_mean_order() -> None:
    # new = t1; new += (t2 - new) / 2; new += (t3 - new) / 3: the official order, in float32
    ts = [torch.tensor([0.1]), torch.tensor([0.7]), torch.tensor([0.3])]
    new = ts[0].clone()
    new += (ts[1] - new) / 2
    new += (ts[2] - new) / 3
    assert torch.equal(running_mean(ts), new)


def test_weights_scale_task_vectors_before_the_svd() -> None:
    a, b = torch.diag(t64([3.0, 1.0])), torch.ones(2, 2, dtype=F64)
    out = tsv_merge(torch.zeros(2, 2, dtype=F64), [a, b], [2.0, -0.5])
    assert_values(out, torch.from_numpy(reference([2 * a.numpy(), -0.5 * b.numpy()])))


def test_polar_of_orthonormal_is_itself() -> None:
    q, _ = torch.linalg.qr(torch.randn(5, 3, generator=torch.Generator().manual_seed(1),
                                       dtype=F64))
    assert_values(polar(q), q)
    assert_values(polar(q).T @ polar(q), torch.eye(3, dtype=F64))


# --- invariants -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


def _taus(seed: int, shape: tuple[int, int], count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(count)]


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1), st.floats(-3, 3))
def test_one_task_full_rank_is_task_arithmetic(shape, seed, lam) -> None:
    (tau,) = _taus(seed, shape, 1)
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    assert_values(tsv_merge(base, [tau], [1.0], lam=lam), base + lam * tau, tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(2, 4), st.integers(0, 2**31 - 1), st.floats(0.1, 10))
def test_order_invariance_and_homogeneity(shape, count, seed, scale) -> None:
    taus = _taus(seed, shape, count)
    out = merge(taus)
    assert out.shape == shape and out.dtype == F64
    assert_values(merge(taus[::-1]), out, tol=1e-9)
    assert_values(merge([scale * t for t in taus]), scale * out, tol=1e-9 * max(1.0, scale))
    assert_values(merge([-t for t in taus]), -out, tol=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), shapes,
       st.integers(0, 2**31 - 1))
def test_dtypes(dtype, shape, seed) -> None:
    taus = _taus(seed, shape, 2)
    ref = merge(taus)
    out = tsv_merge(torch.zeros(shape, dtype=dtype), [t.to(dtype) for t in taus], [1.0, 1.0])
    assert out.dtype == dtype and out.shape == shape
    # the low-precision inputs are the rounded task vectors: compare with their float64 merge
    exact = merge([t.to(dtype).double() for t in taus])
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


# --- through the engine -----------------------------------------------------------------------

def _sds(seed: int = 0):
    return weight_and_bias(6, 4, 2, seed)


def test_api_float32_matches_float64() -> None:
    base, models = _sds()
    out = merge_state_dicts(base, models, "tsv", parameters={"lambda": 1.2})
    ref = merge_state_dicts({k: v.double() for k, v in base.items()},
                            [{k: v.double() for k, v in m.items()} for m in models], "tsv",
                            parameters={"lambda": 1.2}, dtype="float64")
    for k in base:
        assert out[k].dtype == torch.float32 and ref[k].dtype == F64
        torch.testing.assert_close(out[k].double(), ref[k], rtol=1e-5, atol=1e-5)
    taus = [m["w"].double() - base["w"].double() for m in models]
    assert_values(ref["w"], base["w"].double() + 1.2 * torch.from_numpy(
        reference([t.numpy() for t in taus])), tol=1e-10)


def test_api_decompose_filter_and_deterministic() -> None:
    base, models = _sds(1)
    params = {"decompose": [{"filter": "w", "value": False}, {"value": True}]}
    out = merge_state_dicts(base, models, "tsv", parameters=params)
    deltas = [m["w"] - base["w"] for m in models]
    torch.testing.assert_close(out["w"], base["w"] + (deltas[0] + (deltas[1] - deltas[0]) / 2))
    again = merge_state_dicts(base, models, "tsv")
    assert all(torch.equal(again[k], merge_state_dicts(base, models, "tsv")[k]) for k in base)


def test_api_with_a_tadrop_block() -> None:
    base, models = _sds(2)
    block = {"method": "tadrop", "drop_rate": 0.5}
    out = merge_state_dicts(base, models, "tsv", sparsify=block)
    # each task's TADrop-sparsified task vector, from a one-model task-arithmetic merge
    sparse = [{k: v - base[k] for k, v in merge_state_dicts(base, [m], "task_arithmetic",
                                                            sparsify=block).items()}
              for m in models]
    assert all(int((s["w"] == 0).sum()) >= 10 for s in sparse)  # about half dropped
    for k in base:
        want = tsv_merge(base[k], [s[k] for s in sparse], [1.0, 1.0])
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)
    plain = merge_state_dicts(base, models, "tsv")
    assert not torch.allclose(plain["w"], out["w"])


def test_cli_merge_on_the_tiny_family(family_f32: Family, tmp_path: Path) -> None:
    out, base, experts = merged_twice(family_f32, "tsv", {"lambda": 0.8}, tmp_path)
    for k, v in out.items():
        want = tsv_merge(base[k].double(), [e[k].double() - base[k].double() for e in experts],
                         [1.0, 1.0], lam=0.8)
        torch.testing.assert_close(v.double(), want, rtol=1e-4, atol=1e-5)
    matrices = [k for k in base if base[k].dim() == 2]
    assert matrices and any(not torch.equal(out[k], base[k]) for k in matrices)
