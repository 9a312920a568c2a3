"""``mergewise bench {tasks,build,run} --zoo vision``: the vision zoo through the text runner.

The end-to-end test builds the smoke zoo (tiny random-init backbone, 8 steps per expert, two
real image tasks; accuracies mean nothing there) and runs the smoke rows into a temp dir: a few
seconds. The evaluator and classifier checks use a synthetic task and need no data wheel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mergewise.bench import runner, vision_run
from mergewise.bench import vision_tasks as vt
from mergewise.bench import vision_zoo as vz
from mergewise.bench.keys import key_hash
from mergewise.bench.model import Head
from mergewise.bench.selection import bounded_accuracies
from mergewise.cli import app

MISSING = vt.missing_vision_requirements()
needs_wheels = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")


def _bench(*args: object):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


def _task(n: int = 40, size: int = 16, seed: int = 0) -> vt.VisionTask:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(n, size, size)).astype(np.uint8)
    labels = (np.arange(n) % 3).astype(np.int64)
    split = vt.ImageSplit(images, labels)
    return vt.VisionTask(f"syn{seed}", ("a", "b", "c"), split, split.head(30), split, "test")


def test_vision_evaluator_agrees_with_vision_zoo_evaluate_and_the_bounded_path():
    tasks = [_task(seed=0), _task(seed=1)]
    model = vz.base_backbone("tiny")
    g = torch.Generator().manual_seed(0)
    heads = {t.name: Head(torch.randn(3, 16, generator=g), torch.randn(3, generator=g)) for t in tasks}
    ev = vision_run.VisionEvaluator(tasks, "val", None, model, batch_size=7)  # ragged batches
    sd = model.state_dict()
    expected = vz.evaluate(model, heads, tasks, "val")
    assert ev.accuracies(sd, heads) == pytest.approx(expected, abs=0)
    assert bounded_accuracies(ev, sd, heads) == {"val": ev.accuracies(sd, heads)}
    correct = ev.correct(sd, heads)
    assert {t: float(c.float().mean()) for t, c in correct.items()} == ev.accuracies(sd, heads)
    assert ev.sizes() == {"syn0": 30, "syn1": 30}


def test_vision_classifier_keeps_the_backbone_names_and_applies_the_head():
    model = vz.base_backbone("tiny")
    head = Head(torch.randn(3, 16), torch.randn(3))
    ev = vision_run.VisionEvaluator([_task()], "val", 4, model)
    zoo = vision_run.VisionZoo(tasks=["syn0"], base=model.state_dict(), experts={},
                               expert_sd={"syn0": model.state_dict()}, heads={"syn0": head},
                               probes={}, val=ev, test=ev)
    clf = zoo.classifier("syn0")
    assert [n for n, _ in clf.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), head(model(x)))


def test_the_tiny_base_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = vz.base_backbone("tiny"), vz.base_backbone("tiny")
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="unknown vision base 'huge'"):
        vz.base_backbone("huge")


@needs_wheels
def test_lite0_keys_are_those_from_before_the_arch_field():
    task, cfg = _task(), vz.VisionTrainConfig()
    old = key_hash({"kind": "vision-expert", "task": task.name, "data": task.fingerprint(),
                    "train": cfg.__dict__, "versions": vz.vision_versions()})
    assert vz.vision_expert_key(task, cfg) == old  # experts cached before stay found
    assert vz.vision_expert_key(task, cfg, "tiny") != old


@pytest.mark.parametrize("command", ["tasks", "build", "run"])
def test_an_unknown_zoo_is_a_one_line_error(command, tmp_path):
    res = _bench(command, "--zoo", "audio", *(["--cache", tmp_path] if command != "tasks" else []))
    assert res.exit_code == 1
    assert res.output.strip() == "error: --zoo: one of text, vision, got 'audio'"


def test_missing_vision_wheels_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(vt, "missing_vision_requirements", lambda: ["animal-mnist"])
    res = _bench("build", "--zoo", "vision", "--smoke", "--cache", tmp_path)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "the vision benchmark needs animal-mnist" in res.output
    assert vt.VISION_INSTALL_HINT in " ".join(res.output.split())


@needs_wheels
def test_unknown_vision_task_and_missing_zoo_are_one_line_errors(tmp_path):
    res = _bench("build", "--zoo", "vision", "--cache", tmp_path, "--tasks", "digits,cifar")
    assert res.exit_code == 1 and "unknown vision task(s) cifar; known: digits, mnist5k, animals" in res.output
    res = _bench("run", "--zoo", "vision", "--smoke", "--cache", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "run `mergewise bench build --zoo vision" in res.output and "--smoke` first" in res.output


@needs_wheels
def test_vision_smoke_build_run_and_resume(tmp_path: Path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    res = _bench("build", "--zoo", "vision", "--smoke", "--cache", cache)
    assert res.exit_code == 0, res.output
    assert res.output.count("vision expert val accuracy") == 2
    res = _bench("build", "--zoo", "vision", "--smoke", "--cache", cache)  # found by content
    assert res.exit_code == 0 and "vision expert val accuracy" not in res.output
    args = ("run", "--zoo", "vision", "--smoke", "--cache", cache, "--out", out, "--no-progress")
    res = _bench(*args)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in doc["rows"]]
    assert labels[5:] == list(vision_run.VISION_SMOKE_METHODS) and len(labels) == 10
    assert doc["tasks"] == ["digits", "mnist5k"] and doc["test_sizes"] == {"digits": 128, "mnist5k": 128}
    assert (out / "results.png").stat().st_size > 0
    kinds = {r["kind"]: r for r in doc["kind_tables"]["ties+tadrop"] if r["task"] == "digits"}
    assert set(kinds) == {"stem", "depthwise", "pointwise", "head", "bn"}
    assert 0 < kinds["depthwise"]["realised_drop_rate"] < 1 and kinds["bn"]["without_d"] == 20
    md = (out / "results.md").read_text()
    assert "TADrop per module kind, ties+tadrop" in md and "depthwise convolutions (groups > 1)" in md
    # the resume: every evaluation and the kind table come from OUT/cache, nothing is merged
    files = sorted((out / "cache").iterdir())

    def refuse(*a, **k):
        raise AssertionError("a cached evaluation was recomputed")

    monkeypatch.setattr(runner, "evaluate_candidate", refuse)
    monkeypatch.setattr(vision_run, "merge", refuse)
    again = _bench(*args)
    assert again.exit_code == 0, again.output
    assert sorted((out / "cache").iterdir()) == files
    rerun = json.loads((out / "results.json").read_text())
    assert [(r["label"], r["test"]) for r in rerun["rows"]] == [(r["label"], r["test"]) for r in doc["rows"]]
    assert rerun["kind_tables"] == doc["kind_tables"]


def test_the_notes_hold_for_the_backbone():
    """What ``vision_run.NOTES`` says: no block stack for RegMean++, no Grams for depthwise/BN."""
    from mergewise.features import capture
    from mergewise.features.sequential import block_names

    model = vz.base_backbone("tiny")
    assert block_names(model) == []
    stats = capture(model, [torch.randn(2, 3, 16, 16)])
    assert not any(".depthwise." in n or ".bn" in n for n in stats.layers)
    assert any(".project." in n for n in stats.layers) and "stem.conv" in stats.layers


@needs_wheels
def test_the_matched_study_runs_on_the_vision_zoo(tmp_path: Path, monkeypatch):
    """`bench study matched --zoo vision`: TADrop against the uniform trim at the same p̄ on the
    convolution zoo (the smoke zoo, two arms, two validation redraws, one λ, to stay seconds)."""
    from mergewise.bench import studies

    monkeypatch.setattr(studies, "LAMBDA_SUM", (0.5,))
    monkeypatch.setattr(studies, "SEEDS", (0, 1))
    monkeypatch.setattr(studies, "matched_arms", lambda p=0.9: [
        ("ties", [studies.uniform_arm("ties", p), studies.tadrop_arm("ties", p)])])
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert _bench("build", "--zoo", "vision", "--smoke", "--cache", cache).exit_code == 0
    res = _bench("study", "matched", "--zoo", "vision", "--smoke", "--cache", cache, "--out", out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "study-matched.json").read_text())
    assert doc["tasks"] == list(vision_run.VISION_SMOKE_TASKS)
    (group,) = doc["groups"]
    labels = [a["arm"] for a in group["arms"]]
    assert group["method"] == "ties" and labels == ["ties (uniform)", "ties + tadrop(0.9)"]
    for a in group["arms"]:
        assert 0.85 < a["realised_drop_rate"] < 0.95, a  # both at p̄ = 0.9, realised
    assert "ties + tadrop(0.9)" in (out / "study-matched.md").read_text()
    res = _bench("study", "tasks", "--zoo", "vision", "--smoke", "--cache", cache, "--out", out)
    assert res.exit_code == 1 and "the vision zoo has three" in res.output
