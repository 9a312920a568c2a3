"""Vision zoo on a tiny random-init backbone and a synthetic two-class image task: seeded
training, frozen vs trained BN statistics, the content-keyed cache and the evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mergewise.bench import vision_model as vm
from mergewise.bench import vision_zoo as vz
from mergewise.bench.model import Head
from mergewise.bench.vision_tasks import ImageSplit, VisionTask, missing_vision_requirements


def synthetic_task(n: int = 48, size: int = 16) -> VisionTask:
    """Class 1 has a bright left half, class 0 a bright right half (plus noise)."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    for i, y in enumerate(labels):
        half = slice(0, size // 2) if y else slice(size // 2, size)
        images[i, :, half] += 150
    split = lambda a, b: ImageSplit(images[a:b], labels[a:b].astype(np.int64))  # noqa: E731
    return VisionTask("synthetic", ("right", "left"), split(0, 32), split(32, 40), split(40, 48), "test")


def tiny_pretrained(num_classes=None) -> vm.EfficientNetLite:
    torch.manual_seed(0)
    return vm.tiny_backbone().eval()


CFG = vz.VisionTrainConfig(steps=6, batch_size=8, lr=3e-3, head_lr=3e-2)


def test_training_is_a_function_of_the_seed():
    task = synthetic_task()
    a, ha, info = vz.train_expert(task, CFG, backbone=tiny_pretrained())
    b, hb, _ = vz.train_expert(task, CFG, backbone=tiny_pretrained())
    c, _, _ = vz.train_expert(task, CFG.__class__(**{**CFG.__dict__, "seed": 1}), backbone=tiny_pretrained())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert torch.equal(ha.weight, hb.weight)
    assert not torch.equal(a.stem.conv.weight, c.stem.conv.weight)
    assert len(info["losses"]) == 6 and not a.training


@pytest.mark.parametrize("bn_stats", ["frozen", "train"])
def test_bn_statistics_frozen_or_trained(bn_stats):
    base = tiny_pretrained()
    cfg = vz.VisionTrainConfig(**{**CFG.__dict__, "bn_stats": bn_stats})
    trained, _, _ = vz.train_expert(synthetic_task(), cfg, backbone=tiny_pretrained())
    same = torch.equal(trained.head.bn.running_var, base.head.bn.running_var)
    assert same == (bn_stats == "frozen")
    assert not torch.equal(trained.head.bn.weight, base.head.bn.weight)  # affine: always trained


def test_config_rejects_bad_numbers():
    with pytest.raises(ValueError, match="bn_stats"):
        vz.VisionTrainConfig(bn_stats="running")
    with pytest.raises(ValueError, match="lr must be finite"):
        vz.VisionTrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        vz.VisionTrainConfig(steps=0)


def test_evaluate_scores_each_task_with_its_head():
    task = synthetic_task()
    backbone = tiny_pretrained()
    feats = vz.split_features(backbone, task.test)
    assert feats.shape == (8, 16)
    head = Head(torch.zeros(2, 16), torch.tensor([0.0, 1.0]))  # always answers class 1
    assert vz.evaluate(backbone, {"synthetic": head}, [task], "test") == {"synthetic": 0.5}


@pytest.mark.skipif(bool(missing_vision_requirements()), reason="needs the vision wheels")
def test_expert_cache_by_content(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(vz, "load_pretrained", lambda num_classes=None: tiny_pretrained())
    task = synthetic_task()
    logs: list[str] = []
    first = vz.build_vision_expert(tmp_path, task, CFG, log=logs.append)
    assert len(logs) == 1 and (first.path / "head.safetensors").is_file()
    again = vz.build_vision_expert(tmp_path, task, CFG, log=logs.append)
    assert again.path == first.path and len(logs) == 1  # found, not retrained
    other = vz.build_vision_expert(tmp_path, task, vz.VisionTrainConfig(**{**CFG.__dict__, "steps": 7}),
                                   log=logs.append)
    assert other.path != first.path and len(logs) == 2
    backbone = first.backbone()
    assert backbone.classifier is None and first.head().weight.shape == (2, 16)
    head, entry = vz.build_vision_probe(tmp_path, task)
    assert head.weight.shape == (2, 16) and 0 <= entry["val_accuracy"] <= 1
    cached = vz.build_vision_probe(tmp_path, task)[1]
    assert (cached["path"], cached["val_accuracy"]) == (entry["path"], entry["val_accuracy"])
