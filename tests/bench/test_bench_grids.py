"""The benchmark's rows and grids are derived from the method registry (no transformers needed)."""

from __future__ import annotations

import pytest

import mergewise  # noqa: F401  (fills the registries)
from mergewise.bench.report import selected_text
from mergewise.bench.runner import (
    CORE_METHODS,
    OPTIONAL_ROWS,
    RECENT_DATA_AWARE,
    RECENT_METHODS,
    TADROP,
    Grids,
    RunConfig,
    available_rows,
    variant,
)
from mergewise.errors import RecipeError
from mergewise.registry import METHODS

G = Grids()


def test_core_rows_and_their_grids():
    ta = variant("task_arithmetic", G)
    assert ta.grid == (("lambda", G.lambda_sum),)  # density 1.0 by default: no trim, no density grid
    ties = variant("ties", G)
    assert ties.grid == (("lambda", G.lambda_mean), ("density", G.density["magnitude"]))
    dare = variant("dare_ties", G)
    assert dare.grid == (("lambda", G.lambda_mean), ("density", G.density["random"]))
    # measured as published: the defaults follow mergekit, the row the DARE paper
    assert dare.parameters == {"aggregate": "mean", "rescale_rule": "density"}
    assert variant("dare_ties" + TADROP, G).parameters == {"aggregate": "mean"}
    bc = variant("breadcrumbs", G)
    assert bc.grid == (("lambda", G.lambda_sum), ("density", G.density["breadcrumbs"]))
    assert variant("linear", G).candidates() == [{"parameters": {}, "sparsify": None}]


def test_tadrop_rows_replace_the_trim_step():
    v = variant("ties" + TADROP, G)
    assert v.method == "ties" and v.sparsify == {"method": "tadrop"}
    cands = v.candidates()
    assert len(cands) == len(G.lambda_mean) * len(G.drop_rate)
    assert all("density" not in c["parameters"] for c in cands)
    assert {c["sparsify"]["drop_rate"] for c in cands} == set(G.drop_rate)
    # weight averaging takes no sparsify block: the same merge as task_arithmetic's mean
    lin = variant("linear" + TADROP, G)
    assert lin.method == "task_arithmetic"
    assert lin.parameters == {"normalize": True, "lambda": 1.0}
    assert len(lin.candidates()) == len(G.drop_rate)


def test_every_default_row_is_valid_for_the_registry():
    from mergewise.recipe import parse_recipe

    names, _ = available_rows(RunConfig().methods)
    for name in names:
        v = variant(name, G)
        for c in v.candidates():
            models = [{"model": f"<{t}>", "name": t} for t in "ac"]
            if METHODS.get(v.method).features:  # data-aware: the runner passes captured stats
                models = [{**m, "features": f"{m['name']}.safetensors"} for m in models]
            data = {"merge_method": v.method, "base_model": "<b>", "parameters": c["parameters"],
                    "models": models}
            if c["sparsify"]:
                data["sparsify"] = c["sparsify"]
            parse_recipe(data, "bench")  # raises on an unknown or out-of-range parameter
    assert set(CORE_METHODS) <= {n.removesuffix(TADROP) for n in RunConfig().methods}


def test_unknown_method_and_impossible_tadrop_row():
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        variant("tiez", G)
    with pytest.raises(ValueError, match="no TADrop row"):
        variant("slerp" + TADROP, G)


def test_selected_text():
    assert selected_text({"parameters": {"lambda": 0.5}, "sparsify": None}) == "lambda=0.5"
    assert selected_text({"parameters": {"lambda": 1.0},
                          "sparsify": {"method": "tadrop", "drop_rate": 0.8}}) == \
        "tadrop: lambda=1, drop_rate=0.8"


def test_small_tasks_stop_after_max_epochs_and_are_keyed_by_effective_steps():
    from mergewise.bench.zoo import TrainConfig

    cfg = TrainConfig()  # 300 steps, batch 32, at most 8 epochs
    assert cfg.steps_for(570) == 143 and cfg.steps_for(11_252) == 300
    assert cfg.key_fields(570)["steps"] == 143
    # raising the cap changes nothing for a task the epoch limit already binds
    assert TrainConfig(steps=400).key_fields(570) == cfg.key_fields(570)
    assert "checkpoint_every" not in cfg.key_fields(570)


def test_a_methods_own_choices_keep_the_default_candidates_unchanged():
    lot = variant("lot", G)
    cands = lot.candidates()
    assert len(cands) == len(G.lambda_mean) * 2
    rows = [c for c in cands if "tasks" not in c["parameters"]]  # the default: same cache keys
    equal = [c for c in cands if c["parameters"].get("tasks") == "equal"]
    assert len(rows) == len(equal) == len(G.lambda_mean)
    assert rows[0]["parameters"] == {"lambda": G.lambda_mean[0]}
    assert len(variant("lot+tadrop", G).candidates()) == len(G.lambda_mean) * 2 * len(G.drop_rate)


def test_issue16_rows_and_their_grids():
    rows = RunConfig().methods
    for m in RECENT_METHODS:  # every one takes a sparsify block: a TADrop row each
        assert METHODS.get(m).accepts_sparsify and m in rows and m + TADROP in rows
    assert set(RECENT_DATA_AWARE) <= set(rows)
    assert variant("tsv", G).grid == (("lambda", (0.7, 1.0, 1.4)),)
    assert variant("iso_cts", G).grid == (("lambda", (1.0, 1.5, 2.0)),)
    assert variant("wudi", G).candidates() == [{"parameters": {"lambda": 1.0}, "sparsify": None}]
    assert variant("tall_masks", G).grid == (("mask_lambda", (0.6, 0.4, 0.2)),)
    assert variant("consensus+tadrop", G).grid == (("lambda", (0.3, 0.5, 0.7, 1.0)),
                                                     ("sparsify.drop_rate", (0.7, 0.9)))
    assert variant("regmean_plusplus", G).candidates() == [{"parameters": {}, "sparsify": None}]
    with pytest.raises(ValueError, match="no TADrop row"):
        variant("regmean_plusplus" + TADROP, G)


def test_an_unregistered_optional_row_is_skipped_with_a_note():
    assert OPTIONAL_ROWS == ("fisher",)
    run, notes = available_rows(["ties", "fisher"])
    if "fisher" in METHODS:  # the fisher branch has landed: a row like any other
        assert run == ["ties", "fisher"] and notes == []
        variant("fisher", G)
    else:
        assert run == ["ties"] and notes == ["fisher: skipped, method 'fisher' is not registered in this build"]
    assert available_rows(["tiez"]) == (["tiez"], [])  # a typo is not optional: variant refuses it
