"""Hostile numbers: NaN, Inf, huge ints, booleans and strings where numbers go, fractions where
ints go. ``x < low`` is False for NaN, so a NaN used to pass every range check (a dare_ties merge
equal to the base, TADrop dropping nothing, a ties traceback mid-merge). Every number a user
gives is now checked finite, typed and in range by one rule (``registry.as_kind``) and refused
in one line naming the parameter (and model / filter entry) before any tensor is read.

The type rule, decided here and kept everywhere (parameters and the recipe's own numbers):
a float takes an int or a float; an int takes an int or an integral float (``2.0``, ``1e3``;
as pydantic and mergekit do); a bool only ``true``/``false`` (mergekit would read ``1`` or
``"yes"``; refused rather than guessed); a boolean is never a number; a quoted number is a
string (refused, with the hint to drop the quotes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from ckpt_helpers import Family, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli

from mergewise import RecipeError, parse_recipe
from mergewise.params import resolve_job

NAN, INF = math.nan, math.inf


def ties(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"merge_method": "ties", "base_model": "base",
                            "models": [{"model": "a"}, {"model": "b"}]}
    data.update(changes)
    return data


def refused(data: Any) -> str:
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data, "r.yaml")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("r.yaml: ") and len(msg) <= 400, msg
    return msg


def one_model(method: str, **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": "base",
            "models": [{"model": "a", "parameters": params}, {"model": "b"}]}


# (recipe, text the one-line error must contain)
REFUSED: list[tuple[str, dict[str, Any], list[str]]] = [
    # method-wide parameters
    ("ties density nan", ties(parameters={"density": NAN}),
     ["parameters: 'density' must be a finite number, got nan", "(0, 1]"]),
    ("ties density inf", ties(parameters={"density": INF}), ["'density' must be a finite number, got inf"]),
    ("ties density -inf", ties(parameters={"density": -INF}), ["'density' must be a finite number"]),
    ("dare_ties density nan", {**ties(parameters={"density": NAN}), "merge_method": "dare_ties"},
     ["'density' must be a finite number"]),
    ("lambda nan", ties(parameters={"lambda": NAN}), ["'lambda' must be a finite number"]),
    ("lambda huge int", ties(parameters={"lambda": 10**400}),
     ["'lambda' must be a finite number, got <an integer of about 401 digits>"]),
    ("slerp t nan", {"merge_method": "slerp", "models": ["a", "b"], "parameters": {"t": NAN}},
     ["'t' must be a finite number"]),
    ("slerp t gradient nan", {"merge_method": "slerp", "models": ["a", "b"],
                              "parameters": {"t": [0.0, NAN, 1.0]}},
     ["parameters.t[1]: 't' must be a finite number"]),
    ("slerp t gradient inf in filter", {"merge_method": "slerp", "models": ["a", "b"], "parameters": {
        "t": [{"filter": "self_attn", "value": [0.0, INF]}, {"value": 0.5}]}},
     ["parameters.t[0].t[1]: 't' must be a finite number, got inf"]),
    ("karcher tol nan", {"merge_method": "karcher", "models": ["a", "b"], "parameters": {"tol": NAN}},
     ["'tol' must be a finite number"]),
    ("karcher max_iter huge", {"merge_method": "karcher", "models": ["a", "b"],
                               "parameters": {"max_iter": 10**12}},
     ["'max_iter' must lie in [-2147483647, 2147483647] (an int), got 1000000000000"]),
    ("karcher max_iter fraction", {"merge_method": "karcher", "models": ["a", "b"],
                                   "parameters": {"max_iter": 2.5}},
     ["'max_iter' must be an int, got 2.5"]),
    ("karcher max_iter nan", {"merge_method": "karcher", "models": ["a", "b"],
                              "parameters": {"max_iter": NAN}},
     ["'max_iter' must be a finite number, got nan"]),
    # per-model parameters
    ("weight nan", one_model("ties", weight=NAN), ["models.0.parameters: 'weight' must be a finite number"]),
    ("weight inf filter", one_model("ties", weight=[{"filter": "mlp", "value": INF}]),
     ["models.0.parameters.weight[0]: 'weight' must be a finite number, got inf"]),
    ("density nan filter", one_model("ties", density=[{"glob": "*mlp*", "value": 0.5},
                                                     {"value": NAN}]),
     ["models.0.parameters.density[1]: 'density' must be a finite number"]),
    ("breadcrumbs gamma nan", one_model("breadcrumbs", gamma=NAN), ["'gamma' must be a finite number"]),
    ("della epsilon nan", one_model("della", epsilon=NAN), ["'epsilon' must be a finite number"]),
    ("weight True", one_model("ties", weight=True), ["'weight' must be a float", "got True (a boolean)"]),
    ("weight quoted", one_model("ties", weight="0.5"),
     ["'weight' must be a float", "a quoted string: write the number without quotes"]),
    ("weight mixed gradient", one_model("ties", weight=[0.5, "x"]),
     ["models.0.parameters.weight: expected a number", "got [0.5, 'x']"]),
    # sparsify blocks (TADrop, DARE...)
    ("tadrop drop_rate nan", ties(sparsify={"method": "tadrop", "drop_rate": NAN}),
     ["sparsify: 'drop_rate' must be a finite number", "[0, 1)"]),
    ("tadrop strength inf", ties(sparsify={"method": "tadrop", "strength": INF}),
     ["'strength' must be a finite number"]),
    ("tadrop quantiles nan", ties(sparsify={"method": "tadrop", "quantiles": [0.5, NAN]}),
     ["'quantiles' item 1 must be a finite number"]),
    ("tadrop quantiles too long", ties(sparsify={"method": "tadrop", "quantiles": [0.5] * 2000}),
     ["'quantiles' has 2000 items; at most 1024"]),
    ("tadrop skip not strings", ties(sparsify={"method": "tadrop", "skip": [1, 2]}),
     ["'skip' item 0 must be a string, got 1"]),
    ("per-model random density nan", ties(models=[{"model": "a", "sparsify": {
        "method": "random", "density": NAN}}, "b"]),
     ["models.0.sparsify: 'density' must be a finite number"]),
    # booleans
    ("normalize 1", ties(parameters={"normalize": 1}), ["'normalize' must be a bool (true or false), got 1"]),
    ("normalize yes string", ties(parameters={"normalize": "yes"}), ["'normalize' must be a bool"]),
    ("normalize nan", ties(parameters={"normalize": NAN}), ["'normalize' must be a bool"]),
    # slices
    ("slice parameter nan", {"merge_method": "slerp", "base_model": "a", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}],
        "parameters": {"t": NAN}}]}, ["slices.0: slices.0.parameters: 't' must be a finite number"]),
    ("slice source parameter inf", {"merge_method": "ties", "base_model": "a", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 2]},
                    {"model": "b", "layer_range": [0, 2], "parameters": {"weight": -INF}}]}]},
     ["slices.0.sources.1.parameters: 'weight' must be a finite number"]),
    ("layer_range fraction", {"merge_method": "linear", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 1.5]}]}]},
     ["slices.0.sources.0.layer_range.1: must be an int, got 1.5"]),
    ("layer_range True", {"merge_method": "linear", "slices": [{
        "sources": [{"model": "a", "layer_range": [True, 2]}]}]},
     ["layer_range.0: must be an int, got True (a boolean)"]),
    ("layer_range huge", {"merge_method": "linear", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 10**40]}]}]},
     ["layer_range.1: must lie in [-2147483647, 2147483647]"]),
    ("residual_weight nan", {"merge_method": "linear", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": NAN}]},
     ["slices.0.residual_weight: must be a finite number, got nan"]),
    # the recipe's own numbers
    ("seed fraction", ties(seed=1.5), ["seed: must be an int, got 1.5"]),
    ("seed True", ties(seed=True), ["seed: must be an int, got True (a boolean)"]),
    ("seed negative", ties(seed=-1), ["seed: Input should be greater than or equal to 0, got -1"]),
    ("seed nan", ties(seed=NAN), ["seed: must be a finite number, got nan"]),
    ("seed inf", ties(seed=INF), ["seed: must be a finite number, got inf"]),
    ("seed huge", ties(seed=10**30), ["seed: must lie in [-9223372036854775807, 9223372036854775807]"]),
    ("seed quoted", ties(seed="3"), ["seed: must be an int, got '3' (a quoted string"]),
    ("calibration num_examples nan", {"merge_method": "regmean", "models": [
        {"model": "a", "calibration": {"data": "d.txt", "num_examples": NAN}}, "b"]},
     ["models.0.calibration.num_examples: must be a finite number"]),
    ("calibration batch_size 0", {"merge_method": "regmean", "models": [
        {"model": "a", "calibration": {"data": "d.txt", "batch_size": 0}}, "b"]},
     ["models.0.calibration.batch_size: Input should be greater than or equal to 1, got 0"]),
    ("tokenizer pad_to_multiple_of inf", ties(tokenizer={"source": "base", "pad_to_multiple_of": INF}),
     ["tokenizer.pad_to_multiple_of: must be a finite number"]),
    ("token_id fraction", ties(tokenizer={"source": "base", "tokens": {
        "<x>": {"source": {"kind": "model_token", "model": "a", "token_id": 1.5}}}}),
     ["token_id: must be an int, got 1.5"]),
    ("token force 1", ties(tokenizer={"source": "base", "tokens": {"<x>": {"source": "a", "force": 1}}}),
     ["force: must be a bool (true or false), got 1"]),
]


@pytest.mark.parametrize("data, needles", [pytest.param(d, n, id=i) for i, d, n in REFUSED])
def test_hostile_number_is_refused_in_one_line(data: dict[str, Any], needles: list[str]) -> None:
    msg = refused(data)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("data, name, want", [
    (ties(parameters={"density": 1}), "density", 1.0),  # an int is a float
    (ties(parameters={"lambda": -2}), "lam", -2.0),  # no declared range: any finite number
    ({"merge_method": "karcher", "models": ["a", "b"], "parameters": {"max_iter": 20.0}},
     "max_iter", 20),  # an integral float is that int (as pydantic and mergekit read it)
    ({"merge_method": "karcher", "models": ["a", "b"], "parameters": {"max_iter": 1e2}},
     "max_iter", 100),
])
def test_numbers_reach_the_method_as_their_declared_type(data: dict[str, Any], name: str,
                                                        want: Any) -> None:
    job = resolve_job(parse_recipe(data))
    values = {**job.method_params("model.layers.0.mlp.up_proj.weight"),
              **job.models[0].step.params("model.layers.0.mlp.up_proj.weight")} \
        if job.models[0].step else job.method_params("model.layers.0.mlp.up_proj.weight")
    assert values[name] == want and type(values[name]) is type(want)


@pytest.mark.parametrize("seed, want", [(2.0, 2), (1e3, 1000), (7, 7)])
def test_integral_seed(seed: Any, want: int) -> None:
    rec = parse_recipe(ties(seed=seed))
    assert rec.seed == want and type(rec.seed) is int


# --- the reported cases, end to end through the CLI: refused before anything is read or written --

@pytest.mark.parametrize("method, where, text, needle", [
    ("dare_ties", "parameters", "density: .nan", "'density' must be a finite number, got nan"),
    ("ties", "parameters", "density: .nan", "'density' must be a finite number, got nan"),
    ("ties", "parameters", "density: .inf", "'density' must be a finite number, got inf"),
    ("task_arithmetic", "model", "weight: .nan", "models.0.parameters: 'weight' must be a finite number"),
    ("task_arithmetic", "sparsify", "drop_rate: .nan", "sparsify: 'drop_rate' must be a finite number"),
    ("ties", "parameters", "density: [{filter: mlp, value: .nan}, {value: 0.5}]",
     "parameters.density[0]: 'density' must be a finite number"),
    ("ties", "top", "seed: 1.5", "seed: must be an int, got 1.5"),
])
def test_cli_refuses_nan_before_reading(family_f32: Family, tmp_path: Path, method: str, where: str,
                                        text: str, needle: str) -> None:
    data = recipe_for(family_f32, method)
    body = yaml.safe_dump(data, sort_keys=False)
    if where == "parameters":
        body += f"parameters:\n  {text}\n"
    elif where == "model":
        body = body.replace(f"- model: {family_f32.experts[0]}\n",
                            f"- model: {family_f32.experts[0]}\n  parameters: {{{text}}}\n")
    elif where == "sparsify":
        body += f"sparsify: {{method: tadrop, {text}}}\n"
    else:
        body += f"{text}\n"
    path = write_recipe(tmp_path / "r.yaml", body)
    out = tmp_path / "out"
    line = assert_one_line_error(run_cli("merge", path, "--out", out), str(path), needle)
    assert len(line) < 400
    assert not out.exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--drop-rate", "nan", "--drop-rate: 'drop_rate' must be a finite number, got nan"),
    ("--drop-rate", "inf", "--drop-rate: 'drop_rate' must be a finite number, got inf"),
    ("--drop-rate", "1.0", "--drop-rate: 'drop_rate' = 1.0 is out of range; it must lie in [0, 1)"),
    ("--drop-rate", "-0.1", "--drop-rate: 'drop_rate' = -0.1 is out of range"),
    ("--strength", "nan", "--strength: 'strength' must be a finite number, got nan"),
    ("--strength", "-inf", "--strength: 'strength' must be a finite number, got -inf"),
])
def test_inspect_refuses_bad_floats(family_f32: Family, tmp_path: Path, option: str, value: str,
                                    needle: str) -> None:
    out = tmp_path / "plots"
    result = run_cli("inspect", family_f32.experts[0], "--base", family_f32.base, "--out", out,
                     option, value)
    assert_one_line_error(result, needle)
    assert not out.exists()  # no table, no plot
