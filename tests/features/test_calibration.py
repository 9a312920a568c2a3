"""Calibration data (seeded draw, text and tensor readers, batches) and experts as torch modules:
factories, and the one-line error without transformers. None of it needs transformers."""

from __future__ import annotations

import builtins
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from mergewise import FeatureError, merge
from mergewise.features import (
    calibration_batches,
    calibration_settings,
    draw_examples,
    load_factory,
    load_module,
    load_tokenizer,
    read_tensor_inputs,
    read_texts,
)


def test_the_seeded_draw() -> None:
    picked = draw_examples(10, 4, seed=3)
    assert picked == draw_examples(10, 4, seed=3)
    assert picked == torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4].tolist()
    assert len(set(picked)) == 4 and all(0 <= i < 10 for i in picked)
    assert picked != draw_examples(10, 4, seed=4)
    assert sorted(draw_examples(5, 64, seed=0)) == [0, 1, 2, 3, 4]  # all of them when n is smaller


def test_text_readers(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\n  \ntwo words\n")
    assert read_texts(txt) == ["one", "two words"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x"}\n\n{"text": "y", "label": 1}\n')
    assert read_texts(jsonl) == ["x", "y"]
    jsonl.write_text('{"body": "x"}\n')
    assert read_texts(jsonl, "body") == ["x"]
    with pytest.raises(FeatureError, match="line 1 has no string field 'text' .set calibration.text_field"):
        read_texts(jsonl)
    jsonl.write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(FeatureError, match="line 2 is not JSON"):
        read_texts(jsonl)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(FeatureError, match="holds no calibration examples"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    for bad in ("binary.txt", "missing.txt"):
        with pytest.raises(FeatureError, match="cannot read calibration texts"):
            read_texts(tmp_path / bad)


def test_tensor_readers(tmp_path: Path) -> None:
    x = torch.arange(12.0).reshape(6, 2)
    np.save(tmp_path / "x.npy", x.numpy())
    assert torch.equal(read_tensor_inputs(tmp_path / "x.npy"), x)
    save_file({"only": x}, str(tmp_path / "one.safetensors"))
    assert torch.equal(read_tensor_inputs(tmp_path / "one.safetensors"), x)  # a lone tensor unwrapped
    ids = torch.ones(6, 3, dtype=torch.long)
    torch.save({"input_ids": ids, "attention_mask": ids}, tmp_path / "d.pt")
    got = read_tensor_inputs(tmp_path / "d.pt")
    assert isinstance(got, dict) and set(got) == {"input_ids", "attention_mask"}
    assert torch.equal(got["input_ids"], ids)
    torch.save({"a": torch.zeros(6, 1), "b": torch.zeros(5, 1)}, tmp_path / "ragged.pt")
    torch.save(torch.tensor(3.0), tmp_path / "scalar.pt")
    for bad in ("ragged.pt", "scalar.pt"):
        with pytest.raises(FeatureError, match="must be a tensor or a dict of tensors with one first dim"):
            read_tensor_inputs(tmp_path / bad)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(FeatureError, match=r"junk\.pt: cannot read calibration inputs \(") as err:
        read_tensor_inputs(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)


def test_tensor_batches_follow_the_draw(tmp_path: Path) -> None:
    x = torch.arange(20.0).reshape(10, 2)
    torch.save(x, tmp_path / "x.pt")
    batches = calibration_batches(tmp_path / "x.pt", num_examples=9, batch_size=4, seed=1)
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    picked = draw_examples(10, 9, 1)
    assert torch.equal(torch.cat(batches), x[picked])
    inputs = {"input_ids": torch.arange(10).reshape(10, 1), "attention_mask": torch.ones(10, 1)}
    torch.save(inputs, tmp_path / "d.pt")
    batches = calibration_batches(tmp_path / "d.pt", num_examples=9, batch_size=4, seed=1)
    assert all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    assert torch.cat([b["input_ids"] for b in batches]).flatten().tolist() == picked


def test_text_batches_are_tokenized(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n".join(f"text {i}" for i in range(5)))
    calls: list[tuple[list[str], dict[str, object]]] = []

    def tokenizer(texts: list[str], **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append((list(texts), kwargs))
        return {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)}

    batches = calibration_batches(tmp_path / "t.txt", num_examples=3, batch_size=2, max_length=7,
                                  seed=0, tokenizer=tokenizer)
    picked = [f"text {i}" for i in draw_examples(5, 3, 0)]
    assert [texts for texts, _ in calls] == [picked[:2], picked[2:]]
    assert calls[0][1] == {"truncation": True, "max_length": 7, "padding": True, "return_tensors": "pt"}
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    with pytest.raises(FeatureError, match="text calibration data needs a tokenizer"):
        calibration_batches(tmp_path / "t.txt")
    (tmp_path / "t.csv").write_text("a\n")
    with pytest.raises(FeatureError, match=r"unknown calibration data format; use \.txt, \.jsonl, \.pt"):
        calibration_batches(tmp_path / "t.csv")


def test_calibration_settings_identify_the_data_by_content(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("x\n")
    b = tmp_path / "moved" / "b.txt"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    sha = hashlib.sha256(b"x\n").hexdigest()
    assert calibration_settings(a, 8, 2, 16, 0, "text") == {
        "data": str(a.resolve()), "data_sha256": sha, "num_examples": 8, "batch_size": 2,
        "max_length": 16, "seed": 0, "text_field": "text"}
    assert calibration_settings(b, 8, 2, 16, 0, "text")["data_sha256"] == sha
    assert calibration_settings(tmp_path / "gone.txt", 8, 2, 16, 0, "text")["data_sha256"] is None


MODULES = '''
from torch import nn


def linear():
    return nn.Linear(2, 3)


def not_a_module():
    return 3
'''


def test_factories(tmp_path: Path) -> None:
    (tmp_path / "calib_test_factory.py").write_text(MODULES)
    with pytest.raises(FeatureError, match="factory 'no_colon' must look like 'module:function'"):
        load_factory("no_colon")
    path = list(sys.path)
    assert load_factory("calib_test_factory:linear", tmp_path)().weight.shape == (3, 2)
    assert sys.path == path  # the recipe's directory is searched while importing only
    for spec in ("calib_test_factory:missing", "no_such_module_anywhere:build"):
        with pytest.raises(FeatureError, match=f"factory '{spec}': cannot import it"):
            load_factory(spec, tmp_path)
    save_file({"weight": torch.ones(3, 2), "bias": torch.ones(3)}, str(tmp_path / "e.safetensors"))
    module = load_module(tmp_path / "e.safetensors", "calib_test_factory:linear", tmp_path)
    assert isinstance(module, nn.Linear) and not module.training
    assert torch.equal(module.weight, torch.ones(3, 2))
    with pytest.raises(FeatureError, match="returned a int, not a torch.nn.Module"):
        load_module(tmp_path / "e.safetensors", "calib_test_factory:not_a_module", tmp_path)
    save_file({"weight": torch.ones(3, 2), "extra": torch.ones(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(FeatureError, match=r"does not fit the module factory 'calib_test_factory:linear' "
                                           r"builds \(missing 'bias'; 1 missing, 1 unexpected\)"):
        load_module(tmp_path / "odd.safetensors", "calib_test_factory:linear", tmp_path)
    with pytest.raises(FeatureError, match="a Hugging Face directory with config.json, or calibration.factory"):
        load_module(tmp_path / "e.safetensors")


FACTORY = '''
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3), nn.LayerNorm(3))
'''


def test_plain_torch_checkpoints_through_a_factory(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.torch import save_file

    (tmp_path / "lot_test_factory.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3), nn.LayerNorm(3))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(base, tmp_path / "base.pt")
    models = []
    for k in range(2):
        save_file({n: v + 0.1 * torch.randn(v.shape) for n, v in base.items()},
                  str(tmp_path / f"e{k}.safetensors"))
        np.save(tmp_path / f"x{k}.npy", np.random.default_rng(k).normal(size=(12, 1, 6, 6))
                .astype(np.float32))
        models.append({"model": f"e{k}.safetensors", "calibration": {
            "data": f"x{k}.npy", "num_examples": 10, "batch_size": 4,
            "factory": "lot_test_factory:build"}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"merge_method": "lot", "base_model": "base.pt", "models": models}))
    result = merge(tmp_path / "r.yaml", tmp_path / "out")
    units = {r["name"]: r.get("unit") for r in result.records}
    assert units == {"0.weight": "matmul", "0.bias": "shift", "2.weight": "matmul",
                     "2.bias": "shift", "3.weight": "scale", "3.bias": "shift"}
    models[1]["calibration"]["factory"] = "lot_test_factory:nothing"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"merge_method": "lot", "base_model": "base.pt", "models": models}))
    with pytest.raises(FeatureError, match="lot_test_factory:nothing"):
        merge(tmp_path / "r.yaml", tmp_path / "out2")


def test_a_missing_transformers_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails
    with pytest.raises(FeatureError, match="needs transformers"):
        load_module(tmp_path)


def test_a_transformers_that_fails_to_import_is_a_one_line_error_for_tokenizers_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def failing(name: str, *args: object, **kwargs: object) -> object:
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)  # even when it is in sys.modules
    with pytest.raises(FeatureError, match="loading a Hugging Face model or tokenizer needs transformers") as err:
        load_tokenizer(tmp_path / "data.jsonl")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path))
    assert load_tokenizer(None) is None
