"""mergekit's recipe language with mergekit's meaning: substring filters (globs opt-in), a filter
that matches nothing is an error, gradients over layer depth, single filter entries."""

from __future__ import annotations

import pytest
import torch

from mergewise import RecipeError, merge_state_dicts, parse_recipe
from mergewise.params.values import gradient_at

NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
         "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight",
         "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]


def _zoo() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Base 0, one expert with task vector 1 everywhere: task_arithmetic returns lambda."""
    base = {n: torch.zeros(2) for n in NAMES}
    return base, [{n: torch.ones(2) for n in NAMES}]


def _lambda_per_tensor(lam) -> dict[str, float]:
    base, models = _zoo()
    out = merge_state_dicts(base, models, "task_arithmetic", parameters={"lambda": lam})
    return {n: float(t[0]) for n, t in out.items()}


def test_filters_are_substrings_first_match_wins() -> None:
    """The issue's failure: {filter: self_attn} / {filter: mlp} without slices applied nothing."""
    got = _lambda_per_tensor([{"filter": "self_attn", "value": 0.2},
                              {"filter": "mlp", "value": 0.9}, {"value": 0.5}])
    for n, v in got.items():
        assert v == pytest.approx(0.2 if "self_attn" in n else 0.9 if "mlp" in n else 0.5), n
    # "*" alone matches everything (mergekit); a later entry never sees a matched tensor
    got = _lambda_per_tensor([{"filter": "layers.1", "value": 0.7}, {"filter": "*", "value": 0.1},
                              {"filter": "mlp", "value": 0.9}])
    assert {n for n, v in got.items() if v == pytest.approx(0.7)} == {
        n for n in NAMES if "layers.1" in n}
    assert all(v == pytest.approx(0.1) for n, v in got.items() if "layers.1" not in n)


def test_glob_is_the_opt_in_pattern_syntax() -> None:
    got = _lambda_per_tensor([{"glob": "model.layers.*.mlp.*", "value": 0.3}, {"value": 1.0}])
    assert all(v == pytest.approx(0.3 if ".mlp." in n else 1.0) for n, v in got.items())
    # a glob is whole-name and case-sensitive: "mlp" alone matches nothing as a glob
    with pytest.raises(RecipeError, match=r"parameters\.lambda\[0\] \('mlp'\)"):
        _lambda_per_tensor([{"glob": "mlp", "value": 0.3}, {"value": 1.0}])


def test_a_single_filter_entry_is_a_list_of_one() -> None:
    got = _lambda_per_tensor({"filter": "norm", "value": 0.25})
    assert got["model.norm.weight"] == pytest.approx(0.25)
    assert got["model.embed_tokens.weight"] == pytest.approx(1.0)  # the default


def test_a_filter_matching_no_tensor_is_an_error_naming_it() -> None:
    with pytest.raises(RecipeError) as exc:
        _lambda_per_tensor([{"filter": "self_atn", "value": 0.2}, {"value": 0.5}])
    msg = str(exc.value)
    assert "\n" not in msg and "parameters.lambda[0] ('self_atn')" in msg
    assert "substring" in msg
    base, models = _zoo()
    with pytest.raises(RecipeError, match=r"models\.0\.parameters\.weight\[0\] \('attn_q'\)"):
        merge_state_dicts(base, models, "task_arithmetic", model_parameters=[
            {"weight": [{"filter": "attn_q", "value": 2.0}, {"value": 1.0}]}])


def test_filter_and_glob_together_are_refused() -> None:
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe({"merge_method": "ties", "base_model": "b", "models": ["a"],
                      "parameters": {"density": [{"filter": "mlp", "glob": "*mlp*", "value": 1}]}})


def test_gradient_interpolation_is_mergekits() -> None:
    anchors = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert gradient_at(anchors, 0.0) == 0.0 and gradient_at(anchors, 1.0) == 1.0
    assert gradient_at(anchors, 0.5) == 0.3  # exactly on the middle anchor
    # t = 1/3: scaled 4/3 -> i0 1, frac 1/3: (2/3) 0.5 + (1/3) 0.3
    assert gradient_at(anchors, 1 / 3) == (1 - (4 / 3 - 1)) * 0.5 + (4 / 3 - 1) * 0.3
    assert gradient_at(["a", "b", "c"], 0.7, str) == "b"  # step function: int(1.4) = 1
    assert gradient_at([1.0, 5.0], 0.9, int) == 1


def test_gradient_over_layers_and_outside_them() -> None:
    """Three layers: t = 0, 0.5, 1; embeddings and final norm sit at t = 0."""
    got = _lambda_per_tensor([0.0, 1.0])
    for n, v in got.items():
        layer = next((i for i in range(3) if f"layers.{i}." in n), None)
        assert v == pytest.approx(0.0 if layer is None else layer / 2), n
    # a gradient inside a filter entry (the Hub's common slerp form)
    got = _lambda_per_tensor([{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                              {"value": 0.5}])
    assert got["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.3)
    assert got["model.layers.2.self_attn.q_proj.weight"] == pytest.approx(1.0)
    assert got["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)


def test_gradient_anchors_are_each_checked() -> None:
    base = {"merge_method": "ties", "base_model": "b", "models": ["a"]}
    with pytest.raises(RecipeError, match=r"density\[1\].*out of range"):
        parse_recipe({**base, "parameters": {"density": [0.5, 1.5]}})
    with pytest.raises(RecipeError, match="empty list"):
        parse_recipe({**base, "parameters": {"density": []}})
    with pytest.raises(RecipeError, match="gradient"):
        parse_recipe({**base, "parameters": {"density": [0.2, 0.4], "scope": "global"}})


# --- base_model rules ---------------------------------------------------------------------------

def _dir_merge(family, tmp_path, data: dict, name: str) -> dict[str, torch.Tensor]:
    from ckpt_helpers import load_dir, write_recipe

    from mergewise import merge
    merge(write_recipe(tmp_path / f"{name}.yaml", data), tmp_path / name)
    return load_dir(tmp_path / name)


def test_a_listed_base_is_the_base_for_task_vector_methods(family_f32, tmp_path) -> None:
    """mergekit: the base in models: is no extra input; its weight does not normalise."""
    base, experts = str(family_f32.base), [str(e) for e in family_f32.experts]
    params = {"normalize": True}
    listed = _dir_merge(family_f32, tmp_path, {
        "merge_method": "task_arithmetic", "base_model": base, "parameters": params,
        "models": [{"model": base, "parameters": {"weight": 5.0}},
                   *({"model": e, "parameters": {"weight": 1.0}} for e in experts)]}, "listed")
    plain = _dir_merge(family_f32, tmp_path, {
        "merge_method": "task_arithmetic", "base_model": base, "parameters": params,
        "models": [{"model": e} for e in experts]}, "plain")
    assert all(torch.equal(listed[n], plain[n]) for n in plain)


def test_slerp_starts_at_the_base_wherever_it_is_listed(family_f32, tmp_path) -> None:
    base, (a, b) = str(family_f32.base), [str(e) for e in family_f32.experts]
    first = _dir_merge(family_f32, tmp_path, {"merge_method": "slerp", "base_model": base,
                                              "models": [a, base], "parameters": {"t": 0.0}},
                       "first")
    assert all(torch.equal(first[n], family_tensor) for n, family_tensor in
               _dir_state(family_f32.base).items())
    with pytest.raises(RecipeError, match="interpolates from the base"):
        _dir_merge(family_f32, tmp_path, {"merge_method": "slerp", "base_model": base,
                                          "models": [a, b]}, "three")


def test_a_listed_base_stays_an_input_of_linear(family_f32, tmp_path) -> None:
    base, (a, _) = str(family_f32.base), [str(e) for e in family_f32.experts]
    out = _dir_merge(family_f32, tmp_path, {"merge_method": "linear", "base_model": base,
                                            "models": [base, a]}, "lin")
    b0, a0 = _dir_state(family_f32.base), _dir_state(family_f32.experts[0])
    assert all(torch.equal(out[n], (b0[n] + a0[n]) / 2) for n in out)


def test_in_memory_the_base_dict_listed_is_the_base() -> None:
    base, models = _zoo()
    out = merge_state_dicts(base, [base, *models], "task_arithmetic",
                            parameters={"normalize": True},
                            model_parameters=[{"weight": 3.0}, {"weight": 1.0}])
    assert all(torch.equal(t, torch.ones(2)) for t in out.values())


def _dir_state(path) -> dict[str, torch.Tensor]:
    from ckpt_helpers import load_dir
    return load_dir(path)
