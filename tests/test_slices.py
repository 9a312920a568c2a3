"""mergekit's ``slices:``: layer ranges, per-slice bases and parameters, t gradients inside a
slice, frankenmerges that stack layer ranges (renumbered names, config block count)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ckpt_helpers import load_dir, make_family, write_recipe

from mergewise import RecipeError, ShapeMismatchError, merge, merge_state_dicts
from mergewise.methods.slerp import slerp
from mergewise.params.values import gradient_at
from mergewise.synthetic import LlamaShape

FOUR = LlamaShape(vocab=32, hidden=16, intermediate=24, layers=4, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def fam4(tmp_path_factory: pytest.TempPathFactory):
    return make_family(tmp_path_factory.mktemp("fam4"), shape=FOUR, n_experts=2)


def _merge(tmp_path: Path, data: dict, name: str = "out") -> dict[str, torch.Tensor]:
    out = tmp_path / name
    merge(write_recipe(tmp_path / f"{name}.yaml", data), out)
    return load_dir(out)


def _range(model: Path, a: int, b: int, **params) -> dict:
    return {"model": str(model), "layer_range": [a, b], **({"parameters": params} if params else {})}


T_SELF = [0.0, 0.5, 0.3, 0.7, 1.0]
T_MLP = [1.0, 0.5, 0.7, 0.3, 0.0]


def test_slerp_over_a_slice_with_t_gradients_the_hubs_common_recipe(fam4, tmp_path) -> None:
    """The issue's refused recipe: t per filter as a gradient over depth, over slices."""
    base, (a, _) = fam4.base, fam4.experts
    out = _merge(tmp_path, {
        "merge_method": "slerp", "base_model": str(base),
        "slices": [{"sources": [_range(base, 0, 4), _range(a, 0, 4)]}],
        "parameters": {"t": [{"filter": "self_attn", "value": T_SELF},
                             {"filter": "mlp", "value": T_MLP}, {"value": 0.5}]},
        "dtype": "float32"})
    b0, a0 = load_dir(base), load_dir(a)
    for name, got in out.items():
        layer = next((i for i in range(4) if f"layers.{i}." in name), None)
        pos = 0.0 if layer is None else layer / 3
        t = (gradient_at(T_SELF, pos) if "self_attn" in name else
             gradient_at(T_MLP, pos) if "mlp" in name else 0.5)
        assert torch.equal(got, slerp(None, [b0[name], a0[name]], [1.0, 1.0], t=t)), name


def test_one_slice_over_every_layer_is_the_models_form(fam4, tmp_path) -> None:
    base, (a, b) = fam4.base, fam4.experts
    params = {"density": 0.5, "lambda": 0.8}
    sliced = _merge(tmp_path, {"merge_method": "ties", "base_model": str(base),
                               "parameters": params,
                               "slices": [{"sources": [_range(base, 0, 4), _range(a, 0, 4),
                                                       _range(b, 0, 4)]}]}, "sliced")
    plain = _merge(tmp_path, {"merge_method": "ties", "base_model": str(base),
                              "parameters": params, "models": [str(a), str(b)]}, "plain")
    assert sorted(sliced) == sorted(plain)
    assert all(torch.equal(sliced[n], plain[n]) for n in plain)


def test_frankenmerge_stacks_layer_ranges(fam4, tmp_path) -> None:
    """m1 blocks [0, 3) then m2 blocks [1, 4): six blocks, renumbered; embeddings from the first
    slice's model, final norm and head from the last's; config says 6 layers."""
    (a, b) = fam4.experts
    out_dir = tmp_path / "frank"
    merge(write_recipe(tmp_path / "frank.yaml", {
        "merge_method": "linear",
        "slices": [{"sources": [_range(a, 0, 3)]}, {"sources": [_range(b, 1, 4)]}]}), out_dir)
    out, a0, b0 = load_dir(out_dir), load_dir(a), load_dir(b)
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 6
    layer_names = [n for n in a0 if ".layers.0." in n]
    assert len(out) == len(a0) + 2 * len(layer_names)
    for n in layer_names:
        for out_layer, (src, src_layer) in enumerate([(a0, 0), (a0, 1), (a0, 2),
                                                       (b0, 1), (b0, 2), (b0, 3)]):
            assert torch.equal(out[n.replace(".0.", f".{out_layer}.")],
                               src[n.replace(".0.", f".{src_layer}.")])
    assert torch.equal(out["model.embed_tokens.weight"], a0["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], b0["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], b0["lm_head.weight"])


def test_precedence_source_over_slice_over_recipe(fam4, tmp_path) -> None:
    """task_arithmetic with base 0: lambda from the slice beats the recipe; a source's weight
    beats the slice's, which beats the recipe's."""
    base, (a, b) = fam4.base, fam4.experts
    out = _merge(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "parameters": {"lambda": 0.5, "weight": 3.0},
        "slices": [
            {"sources": [_range(base, 0, 2), _range(a, 0, 2, weight=2.0), _range(b, 0, 2)],
             "parameters": {"weight": 1.0}},
            {"sources": [_range(base, 2, 4), _range(a, 2, 4), _range(b, 2, 4)],
             "parameters": {"lambda": 1.0}}]})
    b0, a0, c0 = load_dir(base), load_dir(a), load_dir(b)
    n1, n3 = "model.layers.1.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    ta = {n: merge_state_dicts(b0, [a0, c0], "task_arithmetic", parameters={"lambda": lam},
                               model_parameters=[{"weight": wa}, {"weight": wb}])[n]
          for n, lam, wa, wb in [(n1, 0.5, 2.0, 1.0), (n3, 1.0, 3.0, 3.0)]}
    assert torch.equal(out[n1], ta[n1]) and torch.equal(out[n3], ta[n3])


@pytest.mark.parametrize(("slices", "needle"), [
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}],
     "same number of layers"),
    ([{"sources": [{"model": "B", "layer_range": [0, 2]}, {"model": "C", "layer_range": [0, 2]}]}],
     "not one of the slice's sources"),
    ([{"sources": [{"model": "A", "layer_range": [2, 2]}]}], "0 <= start < end"),
])
def test_bad_slices_are_refused_before_reading(slices, needle) -> None:
    from mergewise import parse_recipe

    with pytest.raises(RecipeError, match=needle):
        parse_recipe({"merge_method": "ties", "base_model": "A", "slices": slices})
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe({"merge_method": "ties", "base_model": "A", "models": ["B"],
                      "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}]}]})


def test_a_layer_range_beyond_the_model_names_it(fam4, tmp_path) -> None:
    (a, _) = fam4.experts
    with pytest.raises(ShapeMismatchError, match=r"slices\.0: .* has no layer 4"):
        _merge(tmp_path, {"merge_method": "linear", "slices": [{"sources": [_range(a, 2, 6)]}]})
    assert not (tmp_path / "out").exists()


def test_slice_gradient_positions_are_per_slice(fam4, tmp_path) -> None:
    """t restarts in every slice: a 2-block slice has its blocks at t = 0 and 1."""
    base, (a, _) = fam4.base, fam4.experts
    out = _merge(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "parameters": {"lambda": [0.0, 1.0]},
        "slices": [{"sources": [_range(base, 0, 2), _range(a, 0, 2)]},
                   {"sources": [_range(base, 2, 4), _range(a, 2, 4)]}]})
    b0, a0 = load_dir(base), load_dir(a)
    for layer, lam in [(0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0)]:
        n = f"model.layers.{layer}.self_attn.q_proj.weight"
        want = merge_state_dicts(b0, [a0], "task_arithmetic", parameters={"lambda": lam})[n]
        assert torch.equal(out[n], want), (layer, lam)
    assert math.isclose(float((out["model.norm.weight"] - b0["model.norm.weight"]).abs().max()),
                        0.0)  # outside the blocks t = 0: lambda 0
