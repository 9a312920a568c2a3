"""Task splits are fixed, disjoint and documented; expert training resumes exactly."""

from __future__ import annotations

import os

import pytest

from mergewise.bench import INSTALL_HINT, missing_requirements

MISSING = missing_requirements()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=(
    f"benchmark data tests need {', '.join(MISSING)}: {INSTALL_HINT}"))
os.environ["HF_HUB_OFFLINE"] = "1"

SIZES = {  # (val, test) written down in data.py
    "rt_sentiment": (500, 1000), "rt_review_vs_plot": (300, 600), "convention_party": (500, 1000),
    "debate_party": (200, 300), "drug_review_sentiment": (120, 379), "gi_word_polarity": (500, 1000),
}
CLASSES = {"debate_party": 3, "drug_review_sentiment": 3}


@pytest.mark.parametrize("name", list(SIZES))
def test_splits_are_fixed_and_disjoint(name):
    from mergewise.bench.data import LOADERS, load_task_data

    task = load_task_data(name)
    again = LOADERS[name]()  # a fresh load, not the cached object
    assert again.fingerprint() == task.fingerprint()
    assert (len(task.val), len(task.test)) == SIZES[name]
    assert len(task.train) >= 400
    texts = [set(task.split(s).texts) for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(task.classes) == CLASSES.get(name, 2)
    for s in ("train", "val", "test"):
        labels = set(task.split(s).labels.tolist())
        assert labels == set(range(len(task.classes))), f"{name}/{s} misses a class"


def test_review_vs_plot_is_balanced():
    from mergewise.bench.data import load_task_data

    t = load_task_data("rt_review_vs_plot")
    n = len(t.train) + len(t.val) + len(t.test)
    plots = int(t.train.labels.sum() + t.val.labels.sum() + t.test.labels.sum())
    assert plots * 2 == n


def test_training_resumes_to_the_same_weights(tmp_path):
    """Interrupt after 2 of 4 steps (checkpoint every 2), resume: same weights as one go."""
    import dataclasses

    import torch

    from mergewise.bench.data import load_task_data
    from mergewise.bench.model import load_minilm_tokenizer
    from mergewise.bench.zoo import SMOKE, train_expert

    task = load_task_data("gi_word_polarity")
    cfg = dataclasses.replace(SMOKE.train, steps=4, checkpoint_every=2, batch_size=8)
    tok = load_minilm_tokenizer()
    straight, head_a, _ = train_expert(task, cfg, tok, tmp_path / "a.pt")

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_expert(task, cfg, tok, tmp_path / "b.pt", stop_at_3)
    assert (tmp_path / "b.pt").exists()
    resumed, head_b, info = train_expert(task, cfg, tok, tmp_path / "b.pt")
    assert len(info["losses"]) == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(head_a.weight, head_b.weight)
