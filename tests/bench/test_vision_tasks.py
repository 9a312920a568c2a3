"""Vision tasks: seeded, disjoint, duplicate-free splits; the resize and pixel scale; the
restricted unpickler; and the three real tasks' sizes (when their wheels are installed)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mergewise.bench import vision_tasks as vt


def test_splits_are_seeded_disjoint_and_drop_duplicates():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 4, 4), dtype=np.uint8)
    images[10] = images[3]  # an exact duplicate: only the first is kept
    labels = np.arange(50) % 5
    a = vt.make_splits(images, labels, val=5, test=10)
    b = vt.make_splits(images, labels, val=5, test=10)
    assert [len(s) for s in a] == [34, 5, 10]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels)
    keys = [{img.tobytes() for img in s.images} for s in a]
    assert sum(len(k) for k in keys) == 49 == len(set().union(*keys))
    other = vt.make_splits(images, labels, val=5, test=10, seed=1)
    assert not np.array_equal(other[2].images, a[2].images)
    with pytest.raises(ValueError, match="cannot give 20 val"):
        vt.make_splits(images, labels, val=20, test=29)


def test_resize_and_pixels():
    img = np.full((2, 8, 8), 255, dtype=np.uint8)
    img[1] = 0
    out = vt.resize(img, 16)
    assert out.shape == (2, 16, 16) and out.dtype == np.uint8
    assert (out[0] == 255).all() and (out[1] == 0).all()
    x = vt.batch_pixels(out)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.full((3, 16, 16), 1.0)) and torch.equal(x[1], torch.full((3, 16, 16), -127 / 128))


def test_array_unpickler_reads_arrays_and_refuses_code(tmp_path: Path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    with gzip.open(tmp_path / "ok.gz", "wb") as fh:
        pickle.dump(arr, fh)
    assert np.array_equal(vt.read_array_pickle(tmp_path / "ok.gz"), arr)
    with gzip.open(tmp_path / "bad.gz", "wb") as fh:
        pickle.dump(print, fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        vt.read_array_pickle(tmp_path / "bad.gz")


MISSING = vt.missing_vision_requirements()


@pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING}: {vt.VISION_INSTALL_HINT}")
@pytest.mark.parametrize(("name", "sizes"), [
    ("digits", (1197, 200, 400)), ("mnist5k", (3500, 500, 1000)), ("animals", (8216, 500, 1000))])
def test_real_tasks_sizes_classes_and_fingerprint(name, sizes):
    task = vt.load_vision_task(name)
    assert tuple(len(task.split(s)) for s in ("train", "val", "test")) == sizes
    assert len(task.classes) == 10
    for s in ("train", "val", "test"):
        split = task.split(s)
        assert split.images.shape[1:] == (vt.RESOLUTION, vt.RESOLUTION)
        assert set(split.labels.tolist()) == set(range(10)), f"{name}/{s} misses a class"
    assert len(task.fingerprint()) == 16
    assert vt.describe(task)["train"] == sizes[0]
