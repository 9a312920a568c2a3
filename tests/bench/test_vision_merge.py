"""Vision merges: the per-module-kind TADrop table (exact on a hand-made report), a ties+TADrop
merge of tiny EfficientNet-Lite experts through the real engine, and the Conv2d feature capture
(unfold of the SAME-padded input reproduces the convolution; depthwise convs get no Gram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergewise.api import merge
from mergewise.bench import vision_model as vm
from mergewise.bench.vision_merge import format_kind_table, kind_table, vision_recipe
from mergewise.features import capture

TINY_FACTORY = "mergewise.bench.vision_model:tiny_backbone"


def test_kind_table_exact_on_a_hand_made_report():
    rows = [  # task a: two depthwise tensors, one pointwise; task b: a bn tensor without d
        {"task": "a", "tensor": "blocks.0.depthwise.conv.weight", "numel": 10, "d": 0.2,
         "drop_rate": 0.5, "kept": 5},
        {"task": "a", "tensor": "blocks.1.depthwise.conv.weight", "numel": 30, "d": 0.4,
         "drop_rate": 0.9, "kept": 3},
        {"task": "a", "tensor": "blocks.1.project.conv.weight", "numel": 100, "d": 0.3,
         "drop_rate": 0.8, "kept": 20},
        {"task": "b", "tensor": "head.bn.running_var", "numel": 16, "d": None,
         "drop_rate": None, "kept": None},
    ]
    table = {(r["task"], r["kind"]): r for r in kind_table({"rows": rows})}
    dw = table[("a", "depthwise")]
    assert (dw["tensors"], dw["numel"]) == (2, 40)
    assert dw["mean_d"] == pytest.approx(0.3) and (dw["min_d"], dw["max_d"]) == (0.2, 0.4)
    assert dw["mean_drop_rate"] == pytest.approx(0.7)
    assert dw["realised_drop_rate"] == pytest.approx(1 - 8 / 40)  # element-weighted, not 0.7
    assert table[("a", "pointwise")]["realised_drop_rate"] == pytest.approx(0.8)
    bn = table[("b", "bn")]
    assert bn["mean_d"] is None and bn["realised_drop_rate"] is None and bn["without_d"] == 1
    text = format_kind_table(kind_table({"rows": rows}))
    assert text.splitlines()[2].startswith("| a | depthwise | 2 | 40 | 0.300 |")


def _family(tmp: Path, deltas: int = 2) -> tuple[Path, dict[str, Path], vm.EfficientNetLite]:
    """A tiny base and experts = base + seeded deltas on the parameters (BN statistics frozen,
    so their task vectors are zero, as in the zoo's default)."""
    torch.manual_seed(0)
    base = vm.tiny_backbone().eval()
    vm.save_checkpoint(base, tmp / "base")
    experts = {}
    for i in range(deltas):
        g = torch.Generator().manual_seed(10 + i)
        expert = vm.load_checkpoint(tmp / "base")
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g) ** 3)  # heavy-tailed
        vm.save_checkpoint(expert, tmp / f"expert{i}")
        experts[f"task{i}"] = tmp / f"expert{i}"
    return tmp / "base", experts, base


def test_ties_tadrop_merge_reports_every_conv_kind(tmp_path: Path):
    base, experts, _ = _family(tmp_path)
    recipe = vision_recipe(base, experts, "ties", {"lambda": 1.0},
                           sparsify={"method": "tadrop", "drop_rate": 0.8})
    merge(recipe, tmp_path / "merged", progress=False)
    merged = vm.load_checkpoint(tmp_path / "merged")  # loads strictly: every tensor is there
    assert merged(torch.zeros(1, 3, 16, 16)).shape == (1, 16)
    table = {(r["task"], r["kind"]): r for r in kind_table(tmp_path / "merged" / "report.json")}
    for task in experts:
        for kind in ("stem", "depthwise", "pointwise", "head"):
            row = table[(task, kind)]
            assert row["without_d"] == 0 and 0 < row["mean_d"] < 1, row
            assert 0.3 < row["realised_drop_rate"] < 1.0, row
        bn = table[(task, "bn")]  # 10 units x (weight, bias, running mean, running var)
        assert bn["tensors"] == 40 and bn["without_d"] == 20  # the statistics: zero task vectors


def test_conv_capture_unfold_reproduces_the_convolution():
    torch.manual_seed(1)
    model = vm.tiny_backbone().eval()
    x = torch.randn(3, 3, 13, 11)
    stats = capture(model, [x])
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    grouped = {n for n, m in convs.items() if m.groups > 1}
    assert grouped == {f"blocks.{i}.depthwise.conv" for i in range(3)}
    assert set(stats.layers) == set(convs) - grouped  # depthwise convs: no Gram (fallback rule)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, (a[0], out)))
             for n, m in convs.items() if n not in grouped]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, (inp, out) in seen.items():
        conv = convs[name]
        cols = F.unfold(inp, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        y = (conv.weight.reshape(conv.out_channels, -1) @ cols).reshape(out.shape)
        torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)  # the Gram's rows are the conv's
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
        torch.testing.assert_close(stats.gram(name), rows.T @ rows)
    assert stats.rows("stem.conv") == 3 * 7 * 6  # ceil(13/2) x ceil(11/2) positions per image


@pytest.mark.parametrize("method", ["regmean", "lot"])
def test_data_aware_merge_runs_on_conv2d(tmp_path: Path, method: str):
    base, experts, _ = _family(tmp_path)
    calib = {}
    for i, task in enumerate(experts):
        images = np.random.default_rng(i).normal(size=(8, 3, 12, 12)).astype(np.float32)
        np.save(tmp_path / f"{task}.npy", images)
        calib[task] = tmp_path / f"{task}.npy"
    recipe = vision_recipe(base, experts, method, calibration=calib, num_examples=8,
                           batch_size=4, factory=TINY_FACTORY)
    merge(recipe, tmp_path / "merged", progress=False)
    merged = vm.load_checkpoint(tmp_path / "merged")
    sds = [vm.load_checkpoint(p).state_dict() for p in experts.values()]
    name = "blocks.1.project.conv.weight"  # a captured pointwise conv: not the plain mean
    mean = (sds[0][name] + sds[1][name]) / 2
    assert not torch.allclose(merged.state_dict()[name], mean, atol=1e-6)
    if method == "regmean":  # depthwise kernels have no Gram: RegMean takes the plain mean
        dw = "blocks.1.depthwise.conv.weight"
        torch.testing.assert_close(merged.state_dict()[dw], (sds[0][dw] + sds[1][dw]) / 2)
