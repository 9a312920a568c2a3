"""Recipes: every mistake is refused before any tensor is read, with ONE line that names the key
(and suggests the fix); filter lists, shorthand, path resolution and precedence rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ckpt_helpers import Family, load_dir, write_recipe
from safetensors.torch import load_file

import mergewise
import mergewise.inputs
from mergewise import RecipeError, load_recipe, merge, merge_state_dicts, parse_recipe
from mergewise.params import resolve
from mergewise.registry import METHODS


def base_recipe(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"merge_method": "ties", "base_model": "base",
                            "models": [{"model": "a"}, {"model": "b"}]}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def refused(data: Any) -> str:
    """The message of the RecipeError ``data`` raises; checks it is a single line."""
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data, "my_recipe.yaml")
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert msg.startswith("my_recipe.yaml: "), msg
    return msg


# --- schema -------------------------------------------------------------------------------------

def test_minimal_recipe_and_defaults() -> None:
    rec = parse_recipe(base_recipe())
    assert rec.merge_method == "ties" and rec.method.name == "ties"
    assert rec.dtype is None and rec.out_dtype is None and rec.seed == 0  # float32 compute
    assert [m.model for m in rec.models] == ["a", "b"]
    assert [m.task_name for m in rec.models] == ["a", "b"]


def test_model_string_shorthand() -> None:
    rec = parse_recipe(base_recipe(models=["path/to/a", {"model": "b", "name": "code"}]))
    assert rec.models[0].model == "path/to/a" and rec.models[0].parameters == {}
    assert rec.models[0].task_name == "a"
    assert rec.models[1].task_name == "code"


@pytest.mark.parametrize("key, suggestion", [("bse_model", "base_model"),
                                             ("merge_methd", "merge_method"),
                                             ("paramters", "parameters"),
                                             ("out_dtpye", "out_dtype")])
def test_unknown_top_level_key(key: str, suggestion: str) -> None:
    data = base_recipe()
    data[key] = data.pop(suggestion, "x")
    msg = refused(data)
    assert f"unknown key '{key}'" in msg and f"did you mean '{suggestion}'" in msg


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    msg = refused(base_recipe(tokenizer_sourse="x"))
    assert "unknown key 'tokenizer_sourse'" in msg and "did you mean 'tokenizer_source'" in msg
    msg = refused(base_recipe(architecture="llama"))
    assert "unknown key 'architecture'" in msg and "allowed: merge_method" in msg


@pytest.mark.parametrize("entry, key, suggestion", [
    ({"model": "a", "weight": 0.5}, "weight", None),  # mergekit users: must go in parameters
    ({"model": "a", "paramters": {}}, "paramters", "parameters"),
    ({"modle": "a"}, "modle", "model"),
])
def test_unknown_per_model_key(entry: dict, key: str, suggestion: str | None) -> None:
    msg = refused(base_recipe(models=[entry, "b"]))
    assert f"unknown key '{key}' at models.0.{key}" in msg
    assert "allowed: model, name, parameters" in msg
    if suggestion:
        assert f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize("where, key, suggestion", [
    ("top", "densty", "density"), ("top", "lamda", "lambda"), ("model", "wieght", "weight"),
    ("top", "agregate", "aggregate"),
])
def test_unknown_parameter_with_suggestion(where: str, key: str, suggestion: str) -> None:
    if where == "top":
        msg = refused(base_recipe(parameters={key: 0.5}))
        assert msg.startswith("my_recipe.yaml: parameters: ")
    else:
        msg = refused(base_recipe(models=[{"model": "a", "parameters": {key: 0.5}}, "b"]))
        assert "models.0.parameters" in msg
    assert f"unknown parameter '{key}' for ties" in msg
    assert f"did you mean '{suggestion}'" in msg
    assert "known: " in msg


def test_unknown_parameter_for_this_method() -> None:
    msg = refused(base_recipe(merge_method="slerp", base_model=None, parameters={"density": 0.2}))
    assert "unknown parameter 'density' for slerp" in msg and "known: t" in msg


@pytest.mark.parametrize("changes, key", [
    ({"parameters": {"density": "high"}}, "density"),
    ({"parameters": {"lambda": True}}, "lambda"),
    ({"parameters": {"lambda": "1.0"}}, "lambda"),
    ({"parameters": {"aggregate": 3}}, "aggregate"),
    ({"parameters": {"density": {"mlp": 0.3}}}, "density"),
    ({"models": [{"model": "a", "parameters": {"weight": "heavy"}}, "b"]}, "weight"),
    ({"models": [{"model": "a", "parameters": {"weight": [1, "heavy"]}}, "b"]}, "weight"),
    ({"seed": "zero"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"dtype": "float8"}, "dtype"),
    ({"out_dtype": "int8"}, "out_dtype"),
    ({"models": "a"}, "models"),
    ({"models": [3]}, "models.0"),
    ({"parameters": [1, 2]}, "parameters"),
    ({"base_model": 3}, "base_model"),
    ({"merge_method": ["ties"]}, "merge_method"),
])
def test_wrong_types(changes: dict, key: str) -> None:
    msg = refused(base_recipe(**changes))
    assert key in msg


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, 1.0000001])
@pytest.mark.parametrize("where", ["top", "model", "filter", "sparsify"])
def test_density_outside_open_closed_unit_interval(value: float, where: str) -> None:
    if where == "top":
        data = base_recipe(parameters={"density": value})
    elif where == "model":
        data = base_recipe(models=["a", {"model": "b", "parameters": {"density": value}}])
    elif where == "filter":
        data = base_recipe(parameters={"density": [{"glob": "*mlp*", "value": 0.5},
                                                   {"value": value}]})
    else:
        data = base_recipe(merge_method="task_arithmetic",
                           sparsify={"method": "magnitude", "density": value})
    msg = refused(data)
    assert "'density'" in msg and "out of range" in msg and "(0, 1]" in msg
    if where == "model":
        assert "models.1.parameters" in msg
    if where == "filter":
        assert "density[1]" in msg


@pytest.mark.parametrize("value", [1, 1.0, 0.001, 0.5])
def test_density_inside_the_interval(value: float) -> None:
    rec = parse_recipe(base_recipe(parameters={"density": value}))
    assert rec.parameters["density"] == value


def test_negative_seed() -> None:
    msg = refused(base_recipe(seed=-1))
    assert "seed" in msg and "greater than or equal to 0" in msg


@pytest.mark.parametrize("name, suggestion", [("tie", "ties"), ("dare-ties", "dare_ties"),
                                              ("SLERP", None), ("task_arithmatic",
                                                                "task_arithmetic")])
def test_unknown_method_with_suggestion(name: str, suggestion: str | None) -> None:
    msg = refused(base_recipe(merge_method=name))
    assert f"merge_method: unknown merge method '{name}'" in msg
    if suggestion:
        assert f"did you mean '{suggestion}'" in msg
    assert msg.endswith("; known: " + ", ".join(sorted(m.name for m in METHODS)))


def test_a_long_unknown_method_name_keeps_the_error_one_short_line() -> None:
    # found by the hostile-recipe property test: an 80-character echo plus the list of every
    # method went past the 400-character bound of a one-line error
    msg = refused(base_recipe(merge_method="9" * 500 + "ties"))
    assert msg.startswith("my_recipe.yaml: ") and len(msg) <= 400 + len("my_recipe.yaml: ")
    assert "'" + "9" * 36 + "...;" in msg and "\n" not in msg
    assert msg.endswith("; known: " + ", ".join(sorted(m.name for m in METHODS)))


@pytest.mark.parametrize("key", ["lambda", "aggregate"])
def test_method_wide_parameter_given_per_model(key: str) -> None:
    value = 0.5 if key == "lambda" else "sum"
    msg = refused(base_recipe(models=[{"model": "a", "parameters": {key: value}}, "b"]))
    assert f"models.0.parameters: '{key}' is method-wide" in msg and "top-level parameters" in msg


def test_per_model_parameter_may_be_given_method_wide() -> None:
    rec = parse_recipe(base_recipe(parameters={"weight": 0.5, "density": 0.4}))
    assert rec.parameters == {"weight": 0.5, "density": 0.4}


@pytest.mark.parametrize("models, base, ok", [
    (["a", "b"], None, True),
    (["a"], "base", True),  # the base is the first end point
    (["a", "b", "c"], None, False),
    (["a", "b", "c"], "base", False),
    (["a"], None, False),
])
def test_model_count_for_slerp(models: list[str], base: str | None, ok: bool) -> None:
    data = {"merge_method": "slerp", "models": models, **({"base_model": base} if base else {})}
    if ok:
        parse_recipe(data)
    else:
        msg = refused(data)
        assert "merge_method slerp needs exactly 2 models" in msg


def test_empty_model_list() -> None:
    assert "models" in refused(base_recipe(models=[]))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs",
                                    "dare_linear", "breadcrumbs_ties"])
def test_base_required_for_task_vector_methods(method: str) -> None:
    msg = refused({"merge_method": method, "models": ["a", "b"]})
    assert f"merge_method {method} needs base_model" in msg


def test_linear_needs_no_base() -> None:
    parse_recipe({"merge_method": "linear", "models": ["a", "b"]})


def test_missing_required_keys() -> None:
    assert "missing required key 'merge_method'" in refused({"models": ["a"]})
    assert "missing required key 'models'" in refused({"merge_method": "ties"})
    assert "missing required key 'model' at models.1.model" in \
        refused(base_recipe(models=["a", {"name": "b"}]))


@pytest.mark.parametrize("data", [None, [], "merge_method: ties", 3])
def test_recipe_must_be_a_mapping(data: Any) -> None:
    assert "must be a mapping" in refused(data)


def test_choice_parameters() -> None:
    msg = refused(base_recipe(parameters={"scope": "model"}))
    assert "'scope' must be one of tensor, global" in msg
    msg = refused(base_recipe(parameters={"aggregate": "median"}))
    assert "'aggregate' must be one of mean, sum, weighted_mean" in msg


def test_slerp_t_range() -> None:
    msg = refused({"merge_method": "slerp", "models": ["a", "b"], "parameters": {"t": 1.5}})
    assert "'t' = 1.5 is out of range" in msg and "[0, 1]" in msg


# --- sparsify blocks ---------------------------------------------------------------------------

def test_sparsify_block_errors() -> None:
    msg = refused(base_recipe(sparsify={"density": 0.3}))
    assert "sparsify" in msg and "method" in msg
    msg = refused(base_recipe(sparsify={"method": "magnitud"}))
    assert "sparsify.method: unknown sparsifier 'magnitud'" in msg and "did you mean 'magnitude'" in msg
    msg = refused(base_recipe(models=[{"model": "a", "sparsify": {"method": "randm"}}, "b"]))
    assert "models.0.sparsify.method: unknown sparsifier 'randm'" in msg
    msg = refused(base_recipe(sparsify={"method": "magnitude", "densty": 0.3}))
    assert "sparsify: unknown parameter 'densty'" in msg and "did you mean 'density'" in msg
    msg = refused(base_recipe(sparsify={"method": "magnitude"}, parameters={"density": 0.3}))
    assert "'density'" in msg and "sparsify block" in msg
    msg = refused({"merge_method": "slerp", "models": ["a", "b"],
                   "sparsify": {"method": "magnitude"}})
    assert "slerp" in msg and "sparsify" in msg


def test_global_scope_refuses_density_filter_list() -> None:
    msg = refused(base_recipe(parameters={"scope": "global",
                                          "density": [{"glob": "*mlp*", "value": 0.3}]}))
    assert "scope: global" in msg and "density" in msg


# --- filter lists ------------------------------------------------------------------------------

def test_filter_list_first_match_wins_and_catch_all() -> None:
    rec = parse_recipe(base_recipe(parameters={"density": [
        {"glob": "*.mlp.*", "value": 0.5},
        {"glob": "*.layers.1.*", "value": 0.7},  # layer 1's MLP already matched above
        {"glob": "*embed_tokens*", "value": 0.9},
        {"value": 0.2},  # catch-all
    ]}))
    d = rec.parameters["density"]
    assert resolve(d, "model.layers.1.mlp.up_proj.weight") == 0.5
    assert resolve(d, "model.layers.1.self_attn.q_proj.weight") == 0.7
    assert resolve(d, "model.embed_tokens.weight") == 0.9
    assert resolve(d, "lm_head.weight") == 0.2
    assert resolve(0.3, "anything") == 0.3
    assert resolve(None, "anything") is None


def test_filter_list_without_catch_all_falls_back_to_default() -> None:
    rec = parse_recipe(base_recipe(parameters={"density": [{"glob": "*mlp*", "value": 0.5}]}))
    d = rec.parameters["density"]
    assert resolve(d, "model.layers.0.mlp.down_proj.weight") == 0.5
    assert resolve(d, "model.norm.weight") is None  # -> the parameter's default
    star = parse_recipe(base_recipe(parameters={"density": [{"filter": "*", "value": 0.1}]}))
    assert resolve(star.parameters["density"], "x.y.z") == 0.1


def test_filter_glob_is_case_sensitive_and_crosses_dots() -> None:
    rec = parse_recipe(base_recipe(parameters={"density": [{"glob": "model.*.weight",
                                                            "value": 0.4}]}))
    d = rec.parameters["density"]
    assert resolve(d, "model.layers.0.mlp.up_proj.weight") == 0.4
    assert resolve(d, "MODEL.layers.0.mlp.up_proj.weight") is None
    assert resolve(d, "lm_head.weight") is None


def test_filter_list_errors() -> None:
    msg = refused(base_recipe(parameters={"density": [{"filtr": "*mlp*", "value": 0.3}]}))
    assert "unknown key 'filtr'" in msg and "did you mean 'filter'" in msg \
        and "allowed: filter, glob, value" in msg and "parameters.density.0.filtr" in msg
    msg = refused(base_recipe(parameters={"density": [{"glob": "*mlp*"}]}))
    assert "missing required key 'value'" in msg and "parameters.density.0" in msg
    msg = refused(base_recipe(parameters={"density": [{"glob": "*mlp*", "value": "x"}]}))
    assert "density[0]" in msg and "must be a float" in msg
    msg = refused(base_recipe(models=[{"model": "a", "parameters": {
        "weight": [{"value": 1.0}, {"filter": "*", "vaue": 2.0}]}}, "b"]))
    assert "unknown key 'vaue' at models.0.parameters.weight.1.vaue" in msg \
        and "did you mean 'value'" in msg
    msg = refused(base_recipe(sparsify={"method": "magnitude",
                                        "density": [{"filtr": "*", "value": 0.3}]}))
    assert "unknown key 'filtr'" in msg and "allowed: filter, glob, value" in msg


def test_filter_lists_drive_the_merge(family_f32: Family) -> None:
    """Per-model filter lists override method-wide scalars, tensor by tensor."""
    base = load_file(family_f32.base / "model.safetensors")
    experts = [load_file(e / "model.safetensors") for e in family_f32.experts]
    filtered = merge_state_dicts(
        base, experts, "task_arithmetic", parameters={"weight": 1.0},
        model_parameters=[{"weight": [{"glob": "*mlp*", "value": 0.0}, {"value": 1.0}]},
                          {"weight": 0.0}])
    only_first = merge_state_dicts(base, experts, "task_arithmetic",
                                   model_parameters=[{"weight": 1.0}, {"weight": 0.0}])
    for name, t in filtered.items():
        if "mlp" in name:
            assert torch.equal(t, base[name]), name
        else:
            assert torch.equal(t, only_first[name]), name
            assert not torch.equal(t, base[name]), name


# --- YAML files --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line", [
    ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1.0\n"
     "  - model: b\n", 6),
    ("merge_method: ties\nmodels:\n  - model: a\n   - model: b\n", 4),
    ("merge_method: ties\nbase_model: base\nmodels: [a, b]\nparameters:\n\tdensity: 0.2\n", 5),
    ("merge_method: ties\nmerge_method: linear\nmodels: [a]\n", 2),  # duplicate key
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, "
     "weight: 2}\n", 5),
])
def test_invalid_yaml_names_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = write_recipe(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: invalid YAML at line {line},")


def test_duplicate_key_message(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", "merge_method: ties\nseed: 1\nseed: 2\nmodels: [a]\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert "duplicate key 'seed' (first given at line 2)" in str(exc.value)


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", yaml.safe_dump(base_recipe(parameters={"densty": 1})))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert str(exc.value).startswith(f"{path}: parameters: unknown parameter 'densty'")
    empty = write_recipe(tmp_path / "empty.yaml", "")
    with pytest.raises(RecipeError) as exc:
        load_recipe(empty)
    assert str(empty) in str(exc.value) and "mapping" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in str(exc.value) and "cannot read" in str(exc.value)


def test_load_recipe_returns_its_directory(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "sub" / "r.yaml", base_recipe())
    rec, root = load_recipe(path)
    assert root == (tmp_path / "sub").resolve()
    assert rec == parse_recipe(base_recipe())


def test_recipe_round_trips_through_yaml() -> None:
    rec = parse_recipe(base_recipe(
        models=["a", {"model": "b", "name": "code", "parameters": {
            "weight": [{"glob": "*mlp*", "value": 0.5}, {"value": 1.0}]}}],
        parameters={"density": 0.3, "lambda": 0.8}, out_dtype="bfloat16", seed=4,
        name="round trip"))
    again = parse_recipe(yaml.safe_load(rec.to_yaml()))
    assert again == rec


# --- paths -------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_recipe_directory(
        family_f32: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "ckpts").symlink_to(family_f32.root, target_is_directory=True)
    recipe = write_recipe(project / "recipes" / "merge.yaml", {
        "merge_method": "ties", "base_model": "../ckpts/base",
        "models": ["../ckpts/expert_0", {"model": "../ckpts/expert_1"}]})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    merge(recipe, tmp_path / "out")
    merge({"merge_method": "ties", "base_model": str(family_f32.base),
           "models": [str(e) for e in family_f32.experts]}, tmp_path / "ref")
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_missing_model_path_is_named_before_anything_is_opened(
        family_f32: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(family_f32.base),
        "models": [str(family_f32.experts[0]), "does/not/exist"]})

    def no_reading(*a: object, **k: object) -> None:  # pragma: no cover - must not be reached
        raise AssertionError("opened a checkpoint before every path was checked")

    monkeypatch.setattr(mergewise.inputs, "open_checkpoint", no_reading)
    with pytest.raises(RecipeError) as exc:
        merge(recipe, tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("models.1.model: 'does/not/exist' does not exist")
    assert str(tmp_path / "does" / "not" / "exist") in msg
    assert not (tmp_path / "out").exists()


def test_invalid_recipe_is_refused_before_any_file_is_touched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reading(*a: object, **k: object) -> None:  # pragma: no cover
        raise AssertionError("touched a checkpoint")

    monkeypatch.setattr(mergewise.inputs, "open_checkpoint", no_reading)
    with pytest.raises(RecipeError):
        merge(base_recipe(parameters={"density": 2.0}), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
