"""Hostile LOT calibration data: token ids outside the model's vocabulary, negative ids, ids given
as floats or bools, empty example lists, every token masked out. Each fails in one line that
names the calibration file and the first bad example, before the model's forward pass (the
capture is replaced by a tripwire), and no stats file is written."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ckpt_helpers import write_recipe
from cli_helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file

from mergewise import FeatureError
from mergewise.features import capture

# the module, not the function ``mergewise.features.capture`` that the package re-exports
capture_module = importlib.import_module("mergewise.features.capture")
VOCAB, SEQ, N = 16, 5, 12
FACTORY = '''
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, input_ids, attention_mask=None):
        return self.norm(self.lin(self.emb(input_ids)))


def build():
    return Tiny()
'''


def good_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "hostile_cal_factory.py").write_text(FACTORY)
    ns: dict[str, Any] = {}
    exec(FACTORY, ns)  # noqa: S102 - the test's own factory
    torch.manual_seed(0)
    for name in ("base", "a"):
        save_file({k: v.detach().clone() for k, v in ns["build"]().state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
    return tmp_path


def features_cli(project: Path, data: str) -> Any:
    recipe = write_recipe(project / "recipe.yaml", {
        "merge_method": "lot", "base_model": "base.safetensors",
        "models": [{"model": "a.safetensors", "name": "a", "features": "stats/a.safetensors",
                    "calibration": {"data": data, "factory": "hostile_cal_factory:build",
                                    "num_examples": 64, "batch_size": 4}}]})
    return run_cli("features", recipe)


@pytest.fixture
def no_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's forward pass ran")

    monkeypatch.setattr(capture_module, "capture", tripwire)


def _with(ids: torch.Tensor, *cells: tuple[int, int, int]) -> torch.Tensor:
    out = ids.clone()
    for row, col, value in cells:
        out[row, col] = value
    return out


def test_good_ids_capture(project: Path) -> None:
    torch.save(good_ids(), project / "a.pt")
    result = features_cli(project, "a.pt")
    assert result.exit_code == 0, result.output
    assert (project / "stats" / "a.safetensors").is_file()


IDS_CASES: dict[str, tuple[Any, list[str]]] = {
    "id-equal-to-vocab": (_with(good_ids(), (5, 2, VOCAB)),
                          ["example 5 has token id 16, outside the vocabulary", "(0..15)"]),
    "first-of-several": (_with(good_ids(), (7, 0, -1), (2, 4, 1000), (9, 1, 99)),
                         ["example 2 has token id 1000"]),
    "negative-id": (_with(good_ids(), (3, 3, -3)), ["example 3 has token id -3"]),
    "float-ids": (good_ids().float(), ["token ids are float32 (example 0", "store input_ids as "
                                                                           "int64"]),
    "float64-ids": (good_ids().double(), ["token ids are float64"]),
    "bool-ids": (good_ids() > 3, ["token ids are bool"]),
    "dict-bad-id": ({"input_ids": _with(good_ids(), (4, 0, 17)),
                     "attention_mask": torch.ones(N, SEQ, dtype=torch.long)},
                    ["example 4 has token id 17"]),
    "dict-float-ids": ({"input_ids": good_ids().half(),
                        "attention_mask": torch.ones(N, SEQ, dtype=torch.long)},
                       ["token ids are float16"]),
    "empty-tensor": (torch.zeros(0, SEQ, dtype=torch.long),
                     ["holds no calibration examples (its inputs have 0 rows)"]),
    "empty-dict": ({"input_ids": torch.zeros(0, SEQ, dtype=torch.long),
                    "attention_mask": torch.zeros(0, SEQ, dtype=torch.long)},
                   ["holds no calibration examples"]),
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npy"])
@pytest.mark.parametrize("case", list(IDS_CASES))
def test_bad_token_ids_fail_before_the_forward_pass(project: Path, no_forward: None, case: str,
                                                    suffix: str) -> None:
    data, needles = IDS_CASES[case]
    path = project / f"data{suffix}"
    if suffix == ".pt":
        torch.save(data, path)
    elif suffix == ".safetensors":
        save_file(data if isinstance(data, dict) else {"input_ids": data}, str(path))
    else:
        if isinstance(data, dict):
            pytest.skip(".npy holds one array")
        np.save(path, data.numpy())
    result = features_cli(project, path.name)
    assert_one_line_error(result, str(path), *needles)
    assert not (project / "stats" / "a.safetensors").exists()


def test_the_merge_path_checks_too(project: Path, no_forward: None, tmp_path: Path) -> None:
    torch.save(_with(good_ids(), (1, 1, 40)), project / "a.pt")
    torch.save(good_ids(), project / "b.pt")
    recipe = write_recipe(project / "merge.yaml", {
        "merge_method": "lot", "base_model": "base.safetensors",
        "models": [{"model": "a.safetensors", "name": f"t{i}",
                    "calibration": {"data": d, "factory": "hostile_cal_factory:build"}}
                   for i, d in enumerate(("a.pt", "b.pt"))]})
    result = run_cli("merge", recipe, "--out", tmp_path / "out", "--no-progress")
    assert_one_line_error(result, str(project / "a.pt"), "example 1 has token id 40")
    assert not (tmp_path / "out").exists()


def test_every_token_masked_out_is_said_so(project: Path) -> None:
    save_file({"input_ids": good_ids(), "attention_mask": torch.zeros(N, SEQ, dtype=torch.long)},
              str(project / "mask.safetensors"))
    result = features_cli(project, "mask.safetensors")
    assert_one_line_error(result, "no layer received a calibration row (12 examples",
                          "masked out by attention_mask")
    assert not (project / "stats" / "a.safetensors").exists()


def test_texts_that_hold_no_example_are_said_so(project: Path) -> None:
    (project / "a.jsonl").write_text("\n  \n\n")
    assert_one_line_error(features_cli(project, "a.jsonl"), str(project / "a.jsonl"),
                          "holds no calibration examples")


def test_zero_examples_in_memory() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(FeatureError, match="^empty: got zero calibration examples"):
        capture(module, [], label="empty")


def test_a_tokenizer_larger_than_the_model_vocabulary(tmp_path: Path, no_forward: None) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=24, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, type_vocab_size=1)
    torch.manual_seed(0)
    for name in ("base", "a"):
        transformers.BertModel(cfg).save_pretrained(str(tmp_path / name))
    words = [f"w{i}" for i in range(40)]  # 45 tokens: ids up to 44, the model embeds 24
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    # transformers 5 ignores vocab_file= here; vocab= is honoured
    transformers.BertTokenizerFast(vocab=vocab).save_pretrained(str(tmp_path / "base"))
    lines = [{"text": "w1 w2"}, {"text": "w3"}, {"text": "w30 w1"}, {"text": "w2"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "lot", "base_model": "base",
        "models": [{"model": "a", "name": "a", "features": "a.stats.safetensors",
                    "calibration": {"data": "a.jsonl", "num_examples": 4, "batch_size": 2}}]})
    result = run_cli("features", recipe)
    assert_one_line_error(result, str(tmp_path / "a.jsonl"), "example 2 has token id 35",
                          "(0..23)")
