"""WUDI-Merging: the Adam solver against a transcription of the official loop (torch.optim.Adam
on the official loss), the closed form against an independent numpy solve, hand values,
tensor selection, TADrop in front, and a CLI merge of the tiny family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import Family, load_dir, recipe_for, write_recipe
from typer.testing import CliRunner

from mergewise import METHODS, merge_state_dicts
from mergewise.cli import app
from mergewise.methods.wudi import adam_solve, closed_form_solve, wudi_delta, wudi_merge

D64 = torch.float64
Q = "model.layers.0.self_attn.q_proj.weight"


def official_wudi(taus: list[torch.Tensor], iterations: int = 300, lr: float = 1e-5
                  ) -> torch.Tensor:
    """vit/wudi_main.py:get_redundant_task_vector, transcribed (autograd + torch.optim.Adam)."""
    vectors = torch.stack(taus)
    merging = torch.nn.Parameter(vectors.sum(0).clone())
    opt = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    l2 = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(iterations):
        inner = torch.matmul(merging.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / l2.unsqueeze(-1).unsqueeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging.detach()


def numpy_minimiser(taus: list[torch.Tensor]) -> np.ndarray:
    """argmin sum_k ||(X - T_k) T_k^T||^2 / ||T_k||^2: X A = B, A = sum G_k, B = sum T_k G_k."""
    ts = [t.numpy().astype(np.float64) for t in taus]
    a = sum(t.T @ t / np.sum(t * t) for t in ts)
    b = sum(t @ (t.T @ t) / np.sum(t * t) for t in ts)
    return np.linalg.solve(a.T, b.T).T


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_registration() -> None:
    m = METHODS.get("wudi")
    assert m.space == "delta" and m.requires_base and m.takes_name and not m.task_specific
    assert m.accepts_sparsify and m.sparsifier is None and m.model_params == ()
    assert [p.name for p in m.params] == ["lambda", "solver", "iterations", "lr", "rtol",
                                          "matrices", "others", "layout"]
    defaults = {p.name: p.default for p in m.params}
    assert defaults["solver"] == "adam" and defaults["iterations"] == 300
    assert defaults["lr"] == 1e-5 and defaults["matrices"] == "linear"
    assert defaults["others"] == "base" and defaults["lambda"] == 1.0


@pytest.mark.parametrize(("shape", "lr"), [((6, 4), 1e-5), ((4, 7), 1e-5), ((6, 4), 1e-3)])
def test_adam_matches_the_official_loop(shape: tuple[int, int], lr: float) -> None:
    """Same loss, same Adam: only the rounding of the gradient differs (analytic here)."""
    taus = [randn(*shape, seed=k) * (k + 1) for k in range(3)]
    want = official_wudi(taus, iterations=300, lr=lr)
    got = adam_solve(taus, iterations=300, lr=lr)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, sum(taus), atol=lr)  # it moved from the sum


def test_hand_values_one_step_and_300() -> None:
    """tau1 = [[1, 0]], tau2 = [[1, 1]]: init [[2, 1]], gradient [[3, 1]]; Adam's first step is
    lr * g / (|g| + eps) per entry; 300 steps stay near the sum, the minimiser is [[1, 1]]."""
    taus = [torch.tensor([[1.0, 0.0]], dtype=D64), torch.tensor([[1.0, 1.0]], dtype=D64)]
    one = adam_solve(taus, iterations=1)
    want = torch.tensor([[2 - 1e-5 * 3 / (3 + 1e-8), 1 - 1e-5 * 1 / (1 + 1e-8)]], dtype=D64)
    torch.testing.assert_close(one, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(adam_solve(taus), official_wudi(taus), rtol=0, atol=1e-13)
    torch.testing.assert_close(adam_solve(taus), torch.tensor([[1.997, 0.997]], dtype=D64),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(closed_form_solve(taus), torch.tensor([[1.0, 1.0]], dtype=D64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize(("shape", "k"), [((5, 3), 2), ((3, 5), 2), ((8, 6), 4), ((2, 7), 4)])
def test_closed_form_matches_an_independent_numpy_solve(shape: tuple[int, int], k: int) -> None:
    taus = [randn(*shape, seed=10 + i) * (0.5 + i) for i in range(k)]
    got = closed_form_solve(taus)
    np.testing.assert_allclose(got.numpy(), numpy_minimiser(taus), rtol=1e-9, atol=1e-11)
    # a stationary point of the official loss (autograd)
    x = got.clone().requires_grad_(True)
    loss = sum(((x - t) @ t.T).square().sum() / t.square().sum() for t in taus)
    loss.backward()
    assert x.grad.abs().max() < 1e-9


def test_adam_converges_to_the_closed_form() -> None:
    taus = [randn(4, 3, seed=20 + i) for i in range(3)]
    got = adam_solve(taus, iterations=20_000, lr=1e-3)
    torch.testing.assert_close(got, closed_form_solve(taus), rtol=0, atol=1e-5)


def test_orthogonal_task_vectors_give_the_sum_exactly() -> None:
    """Disjoint input supports: tau_j tau_k^T = 0 exactly, so the gradient at the sum is 0 and
    the minimiser is the sum."""
    t1 = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, -1.0, 0.0, 0.0]], dtype=D64)
    t2 = torch.tensor([[0.0, 0.0, 0.5, 4.0], [0.0, 0.0, -2.0, 1.0]], dtype=D64)
    assert torch.equal(adam_solve([t1, t2]), t1 + t2)
    torch.testing.assert_close(closed_form_solve([t1, t2]), t1 + t2, rtol=0, atol=1e-12)
    # rotated (still orthogonal, not exactly): the closed form still gives the sum
    basis, _ = torch.linalg.qr(randn(4, 4, seed=3))
    r1, r2 = t1 @ basis.T, t2 @ basis.T
    torch.testing.assert_close(closed_form_solve([r1, r2]), r1 + r2, rtol=0, atol=1e-12)


def test_one_task_gives_itself_and_zero_tasks_take_no_part() -> None:
    t = randn(5, 3, seed=4)
    assert torch.equal(adam_solve([t]), t)
    torch.testing.assert_close(closed_form_solve([t]), t, rtol=0, atol=1e-12)
    wide = randn(2, 6, seed=5)  # rank 2 of 6 inputs: the pseudo-inverse, exact on its rows
    torch.testing.assert_close(closed_form_solve([wide]), wide, rtol=0, atol=1e-12)
    zero = torch.zeros_like(t)
    assert torch.equal(adam_solve([t, zero]), t)
    torch.testing.assert_close(closed_form_solve([t, zero]), t, rtol=0, atol=1e-12)
    assert torch.equal(closed_form_solve([zero, zero]), zero)


def test_scaling_tells_adam_from_a_solve() -> None:
    """c * tau scales the minimiser by c, not Adam's result (steps of ~lr whatever the scale)."""
    taus = [randn(4, 3, seed=30 + i) for i in range(2)]
    big = [t * 100 for t in taus]
    torch.testing.assert_close(closed_form_solve(big), closed_form_solve(taus) * 100,
                               rtol=1e-10, atol=1e-10)
    moved, moved_big = adam_solve(taus) - sum(taus), adam_solve(big) - sum(big)
    assert moved.abs().max() <= 300 * 1e-5 * 1.01 and moved_big.abs().max() <= 300 * 1e-5 * 1.01
    assert not torch.allclose(moved_big, moved * 100, atol=1e-3)


def test_tensor_selection_others_layout_and_lambda() -> None:
    taus = [randn(3, 4, seed=40 + i) for i in range(2)]
    base = randn(3, 4, seed=49)
    solved = adam_solve(taus)
    assert torch.equal(wudi_merge(base, taus, [1.0, 1.0], name=Q), base + solved)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(wudi_merge(base, taus, [1.0, 1.0], name=name), base)
        assert torch.equal(wudi_merge(base, taus, [1.0, 1.0], name=name, others="sum"),
                           base + (taus[0] + taus[1]))
        assert torch.equal(wudi_merge(base, taus, [1.0, 1.0], name=name, others="mean"),
                           base + (taus[0] + taus[1]) / 2)
    assert torch.equal(wudi_merge(base, taus, [1.0, 1.0], name="lm_head.weight",
                                  matrices="all_2d"), base + solved)
    vec = [randn(4, seed=50), randn(4, seed=51)]  # 1-D: never solved
    assert torch.equal(wudi_merge(vec[0], vec, [1.0, 1.0], name="x.bias", matrices="all_2d",
                                  others="mean"), vec[0] + (vec[0] + vec[1]) / 2)
    # (in, out) storage: the same solve on the transposes
    got = wudi_delta([t.T for t in taus], name=Q, layout="in_out", solver="closed_form")
    torch.testing.assert_close(got, closed_form_solve(taus).T, rtol=0, atol=1e-14)
    assert torch.equal(wudi_merge(base, taus, [1.0, 1.0], name=Q, lam=0.5),
                       base + 0.5 * solved)


def tiny_state(seed: int, k: int = 3) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {Q: torch.randn(6, 4, generator=g), "model.norm.weight": torch.ones(4)}
    models = {f"t{i}": {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()}
              for i in range(k)}
    return base, models


def test_api_tadrop_block_runs_in_front() -> None:
    """With 0 Adam steps and others: sum, WUDI is the sum of the task vectors it is given:
    exactly task arithmetic behind the same TADrop block."""
    base, models = tiny_state(0)
    block = {"method": "tadrop", "drop_rate": 0.5}
    params = {"iterations": 0, "others": "sum"}
    got = merge_state_dicts(base, models, "wudi", parameters=params, sparsify=block)
    want = merge_state_dicts(base, models, "task_arithmetic", sparsify=block)
    plain = merge_state_dicts(base, models, "wudi", parameters=params)
    assert all(torch.equal(got[n], want[n]) for n in base)
    assert not torch.equal(got[Q], plain[Q])
    solved = merge_state_dicts(base, models, "wudi", parameters={"solver": "closed_form"},
                               sparsify=block)
    assert not torch.equal(solved[Q], got[Q]) and torch.equal(solved["model.norm.weight"],
                                                              base["model.norm.weight"])


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_api_float32_vs_float64(solver: str) -> None:
    base, models = tiny_state(1)
    f32 = merge_state_dicts(base, models, "wudi", parameters={"solver": solver})
    f64 = merge_state_dicts(base, models, "wudi", parameters={"solver": solver},
                            dtype="float64")
    torch.testing.assert_close(f32[Q].double(), f64[Q].double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_cli_merge_tiny_family(family_f32: Family, tmp_path: Path, solver: str) -> None:
    runner = CliRunner()
    outs = {}
    params = {"solver": solver, "iterations": 30, "lr": 1e-4}  # 30 steps: a quick test
    for label, dtype in (("a", "float32"), ("b", "float32"), ("c", "float64")):
        recipe = write_recipe(tmp_path / f"{label}.yaml", recipe_for(
            family_f32, "wudi", parameters=params, dtype=dtype))
        result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / label),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
        outs[label] = load_dir(tmp_path / label)
    base = load_dir(family_f32.base)
    experts = [load_dir(e) for e in family_f32.experts]
    a, b, c = outs["a"], outs["b"], outs["c"]
    assert sorted(a) == sorted(base)
    assert all(torch.equal(a[n], b[n]) for n in a)  # deterministic
    solved = [n for n in base if base[n].dim() == 2 and "proj" in n]
    assert len(solved) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for n in base:
        assert a[n].dtype == base[n].dtype
        if n in solved:
            taus = [(e[n].double() - base[n].double()) for e in experts]
            want = (adam_solve(taus, iterations=30, lr=1e-4) if solver == "adam"
                    else closed_form_solve(taus))
            torch.testing.assert_close(a[n].double(), base[n].double() + want, rtol=0,
                                       atol=1e-6)
            torch.testing.assert_close(a[n].double(), c[n].double(), rtol=0, atol=1e-6)
            assert not torch.allclose(a[n].double(), base[n].double() + sum(taus), atol=1e-7)
        else:  # norms, embeddings, head: the base (official)
            assert torch.equal(a[n], base[n]) and torch.equal(c[n], base[n])
