"""Batched evaluation equals plain per-example evaluation; stopping early never changes selection.

On the tiny in-memory zoo (``mergewise.bench.tiny``: a 2-layer BertModel, hashed-word texts),
so these run in seconds without the benchmark's data or model wheels.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

import mergewise  # noqa: E402,F401  (fills the registries)
from mergewise.bench.model import collate, encode  # noqa: E402
from mergewise.bench.runner import Grids, RunConfig, _unsafe_stops, run_zoo  # noqa: E402
from mergewise.bench.selection import UpperBound, accuracy_value, bounded_accuracies  # noqa: E402
from mergewise.bench.tiny import TinyZoo, WordTokenizer  # noqa: E402

TINY_RUN = RunConfig(grids=Grids(lambda_sum=(0.3, 1.0, 3.0), lambda_mean=(0.5, 1.0, 4.0),
                                 density={"magnitude": (0.2,)}, drop_rate=(0.8,)),
                     methods=("task_arithmetic", "ties"))


@pytest.fixture(scope="module")
def zoo():
    return TinyZoo().load()


def _per_example_logits(zoo, state_dict, index):
    """The plain reference: one example at a time, no padding, no sorting."""
    from mergewise.bench.tiny import tiny_task

    task = tiny_task(zoo.tasks[index], 100 + index)  # as TinyZoo.load draws it
    zoo.val.model.load_state_dict(state_dict, strict=True)
    ids = WordTokenizer()(list(task.val.texts), max_length=12)["input_ids"]
    with torch.no_grad():
        return torch.cat([zoo.heads[task.name](encode(zoo.val.model, collate([x]))) for x in ids])


def test_batched_padded_evaluation_equals_per_example(zoo):
    for i, name in enumerate(zoo.tasks):
        sd = zoo.expert_sd[name]
        ref = _per_example_logits(zoo, sd, i)
        feats = zoo.val.features(sd)[name]  # length-sorted, per-batch padding, inference mode
        got = zoo.heads[name](feats)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        clear = (ref[:, 0] - ref[:, 1]).abs() > 1e-4  # predictions away from a float-noise tie
        assert clear.sum() > 0.9 * len(ref)
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    acc = zoo.val.accuracies(zoo.expert_sd["tiny_a"], zoo.heads)
    assert bounded_accuracies(zoo.val, zoo.expert_sd["tiny_a"], zoo.heads) == {"val": acc}


def test_accuracy_value_rounds_like_a_float32_mean():
    for c, n in ((341, 500), (1, 3), (0, 7), (120, 120), (99, 379)):
        assert accuracy_value(c, n) == float(torch.tensor([1.0] * c + [0.0] * (n - c)).mean())


def test_upper_bound_on_hand_made_counts():
    b = UpperBound({"a": 4, "b": 2})
    assert b.upper() == 2.0
    b.add("a", 3, 4)  # a finished at 3/4
    assert b.upper() == pytest.approx(1.75)
    b.add("b", 0, 1)  # one of b's two wrong: b can reach 1/2 at most
    assert b.upper() == pytest.approx(1.25)
    assert b.beaten_by(1.3) and not b.beaten_by(1.25) and not b.beaten_by(None)
    with pytest.raises(ValueError, match="3 examples scored"):
        b.add("b", 2, 2)


def test_a_stopped_candidate_could_not_have_won(zoo):
    best = 1.9  # a rival at 95 % on both tasks: the tiny experts (~50 %) stop early
    other = bounded_accuracies(zoo.val, zoo.expert_sd["tiny_b"], zoo.heads, best=best)
    assert other["stopped"]
    real = sum(zoo.val.accuracies(zoo.expert_sd["tiny_b"], zoo.heads).values())
    assert real <= other["val_upper_bound_sum"] < best
    assert other["val_examples_scored"] < sum(zoo.val.sizes().values())
    low = bounded_accuracies(zoo.val, zoo.expert_sd["tiny_b"], zoo.heads, best=real - 0.01)
    assert low == {"val": zoo.val.accuracies(zoo.expert_sd["tiny_b"], zoo.heads)}  # can win: scored


def test_unsafe_stops_are_those_not_proven_to_lose():
    full = {"val": {"a": 0.5, "b": 0.25}}
    assert _unsafe_stops([full, {"stopped": True, "val_upper_bound_sum": 0.7}]) == []
    assert _unsafe_stops([full, {"stopped": True, "val_upper_bound_sum": 0.75}]) == [1]
    assert _unsafe_stops([{"stopped": True, "val_upper_bound_sum": 0.1}]) == [0]


def test_stopping_early_selects_and_scores_exactly_as_full_scoring(tmp_path):
    fast = run_zoo(TinyZoo(), tmp_path / "fast", TINY_RUN, progress=False, log=lambda s: None)
    full = run_zoo(TinyZoo(), tmp_path / "full", replace(TINY_RUN, stop_early=False), progress=False,
                   log=lambda s: None)
    assert [(r["label"], r.get("selected"), r["test"]) for r in fast["rows"]] == \
        [(r["label"], r.get("selected"), r["test"]) for r in full["rows"]]
    stopped = [c for r in fast["rows"] for c in r.get("candidates", ()) if c.get("stopped")]
    assert stopped, "the tiny grids include losing candidates that should stop early"
    # a reused cache with a smaller grid: a stop no longer proven by a scored rival is re-scored
    alone = replace(TINY_RUN, grids=replace(TINY_RUN.grids, lambda_sum=(3.0,)), methods=("task_arithmetic",))
    again = run_zoo(TinyZoo(), tmp_path / "fast", alone, progress=False, log=lambda s: None)
    (row,) = [r for r in again["rows"] if r["label"] == "task_arithmetic"]
    assert row["candidates"][0]["val"] is not None


def test_regmean_plusplus_and_tall_masks_rows_run_on_the_tiny_zoo(tmp_path):
    """RegMean++ reads statistics captured through the merged blocks (runner.method_features);
    TALL masks are task-specific, scored each task through its own encoder; Fisher (once
    registered) reads each expert's diagonal Fisher."""
    run = replace(TINY_RUN, methods=("regmean_plusplus", "tall_masks", "fisher"),
                  grids=replace(TINY_RUN.grids, method={"tall_masks": (("mask_lambda", (0.6,)),)}))
    log: list[str] = []
    doc = run_zoo(TinyZoo(), tmp_path, run, progress=False, log=log.append)
    rows = {r["label"]: r for r in doc["rows"]}
    assert {"regmean_plusplus", "tall_masks"} <= set(rows)
    labels = ["regmean_plusplus", "tall_masks"]
    if "fisher" in mergewise.registry.METHODS:  # each expert's Fisher through its own head
        labels.append("fisher")
        assert doc["skipped"] == []
    else:
        assert doc["skipped"] == ["fisher: skipped, method 'fisher' is not registered in this build"]
    for label in labels:
        assert set(rows[label]["test"]) == set(doc["tasks"]) and rows[label]["test_bits"]
