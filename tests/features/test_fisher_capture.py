"""Diagonal Fisher capture on hand-made torch modules whose Fisher is known in closed form, its
stats file (round trip, strict checks) and its reuse rules; no transformers needed.

Softmax regression logits = W x + b: ∂ log p_c/∂W[j, i] = (δ_cj − p_j) x_i, so the expected
Fisher is F_W[j, i] = mean_n p_nj (1 − p_nj) x_ni², F_b[j] = mean_n p_nj (1 − p_nj).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file
from torch import nn

from mergewise import FeatureError, parse_recipe
from mergewise.features import load_stats, obtain, plan_sources
from mergewise.features.fisher import FISHER, fisher_capture
from mergewise.features.fisherfile import FisherFeature, load_fisher

LN3 = math.log(3.0)


def softmax_regression(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    m = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight))
        m.bias.copy_(torch.tensor(bias))
    return m


def fisher_of(stats, name: str) -> torch.Tensor:
    return stats.tensor(f"fisher:{name}")


def test_expected_fisher_by_hand() -> None:
    # W = 0, b = (0, ln 3): p = (1/4, 3/4) for every x, p(1 - p) = 3/16; x = (1, 2)
    m = softmax_regression([[0.0, 0.0], [0.0, 0.0]], [0.0, LN3])
    stats = fisher_capture(m, [torch.tensor([[1.0, 2.0]])], labels="expected")
    torch.testing.assert_close(fisher_of(stats, "weight"), torch.tensor([[3, 12], [3, 12]]) / 16,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(fisher_of(stats, "bias"), torch.tensor([3.0, 3.0]) / 16,
                               rtol=1e-6, atol=0)
    assert stats.metadata["labels"] == "expected" and stats.metadata["rows"] == "1"


def test_argmax_fisher_by_hand_is_the_mean_of_per_example_squares() -> None:
    # argmax is class 1 for both examples: g_n = (e_1 - p) x_nᵀ, (e_1 - p)² = 1/16 per row.
    # x = (1, 0) and (0, 1): the mean of squares is 1/16 · (1/2, 1/2) per row; the square of
    # the mean gradient would be 1/16 · (1/4, 1/4)
    m = softmax_regression([[0.0, 0.0], [0.0, 0.0]], [0.0, LN3])
    stats = fisher_capture(m, [torch.tensor([[1.0, 0.0], [0.0, 1.0]])], labels="argmax")
    torch.testing.assert_close(fisher_of(stats, "weight"), torch.full((2, 2), 1 / 32),
                               rtol=1e-6, atol=0)
    assert stats.metadata["examples"] == "2"


def test_expected_fisher_matches_the_closed_form_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    m = softmax_regression(torch.randn(3, 4, generator=g).tolist(), torch.randn(3, generator=g).tolist())
    x = torch.randn(10, 4, generator=g)
    stats = fisher_capture(m, [x[:4], x[4:]], labels="auto")  # 3 classes: auto is expected
    x64 = x.double()
    p = torch.softmax(x64 @ m.weight.detach().double().T + m.bias.detach().double(), -1)
    v = p * (1 - p)  # (n, classes)
    torch.testing.assert_close(fisher_of(stats, "weight").double(), v.T @ x64.square() / 10,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher_of(stats, "bias").double(), v.mean(0), rtol=1e-5, atol=1e-7)
    assert stats.metadata["labels"] == "expected"
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in stats._tensors.values()))
    assert float(stats.metadata["fisher_norm"]) == pytest.approx(norm, rel=1e-9)


def test_sampled_labels_are_drawn_from_the_model() -> None:
    # p = (1/4, 3/4): a drawn 0 adds (3/4)² = 9/16 to each bias entry, a drawn 1 adds 1/16, so
    # 16·N·F_b = N + 8·n0 with n0 the number of zeros drawn (Binomial(N, 1/4): 100 ± 8.7)
    m = softmax_regression([[0.0, 0.0], [0.0, 0.0]], [0.0, LN3])
    n = 400
    stats = fisher_capture(m, [torch.ones(n, 2)], labels="sample", seed=3)
    fb = fisher_of(stats, "bias").double()
    n0 = (16 * n * fb[0] - n) / 8
    assert abs(float(n0) - round(float(n0))) < 1e-3 and 65 <= round(float(n0)) <= 135
    torch.testing.assert_close(fb[0], fb[1])
    again = fisher_capture(m, [torch.ones(n, 2)], labels="sample", seed=3)
    assert torch.equal(fisher_of(again, "bias"), fisher_of(stats, "bias"))  # seeded


class Bigram(nn.Module):
    """A causal LM whose logits at token t are the table row of token t."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(table, freeze=False)
        self.unused = nn.Linear(2, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.table(input_ids)


def test_per_token_fisher_masks_padding_by_hand() -> None:
    # rows: token 0 -> p = (1/4, 1/4, 1/2), token 1 -> p = (1/4, 3/4, 0...): p(1 - p) per class
    ln2 = math.log(2.0)
    table = torch.tensor([[0.0, 0.0, ln2], [0.0, LN3, -80.0], [0.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 1, 0, 2], [1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    stats = fisher_capture(Bigram(table), [{"input_ids": ids, "attention_mask": mask}],
                           labels="expected")
    p = torch.softmax(table.double(), -1)
    counts = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)  # real tokens only, P = 6
    want = counts[:, None] / 6 * p * (1 - p)
    torch.testing.assert_close(fisher_of(stats, "table.weight").double(), want, rtol=1e-6, atol=1e-9)
    assert stats.metadata["rows"] == "6" and stats.metadata["examples"] == "2"
    assert "unused.weight" not in stats.shapes  # no gradient reached it: not stored
    assert stats.for_tensor("unused.weight", (2, 2)) is None


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def test_a_tied_parameter_is_stored_once_with_its_alias(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stats = fisher_capture(Tied(), [torch.tensor([[0, 1], [2, 3]])])
    assert set(stats.shapes) == {"emb.weight"} and stats.aliases == {"head.weight": "emb.weight"}
    stats.save(tmp_path / "f.safetensors")
    back = load_fisher(tmp_path / "f.safetensors")
    a, b = back.for_tensor("head.weight", (5, 3)), back.for_tensor("model.emb.weight", (5, 3))
    assert isinstance(a, FisherFeature) and isinstance(b, FisherFeature)
    assert torch.equal(a.fisher, b.fisher) and a.norm == float(stats.metadata["fisher_norm"]) > 0
    with pytest.raises(FeatureError, match=r"'emb.weight' has shape \[5, 3\] but tensor"):
        back.kind_of("emb.weight", (4, 3))


def test_round_trip_and_strict_reading(tmp_path: Path) -> None:
    m = softmax_regression([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    stats = fisher_capture(m, [torch.tensor([[1.0, 2.0]])])
    path = stats.save(tmp_path / "f.safetensors")
    back = load_fisher(path)
    assert back.keys() == stats.keys() and back.metadata["mergewise_fisher"] == "1"
    assert all(torch.equal(back.tensor(k), stats.tensor(k)) for k in stats.keys())
    with pytest.raises(FeatureError, match="not a mergewise stats file"):
        load_stats(path)  # the Gram reader refuses a Fisher file
    meta = dict(back.metadata)
    back.close()
    gram = tmp_path / "gram.safetensors"
    save_file({"rows:a": torch.tensor(1.0, dtype=torch.float64)}, str(gram),
              metadata={"mergewise_features": "1"})
    with pytest.raises(FeatureError, match="is a Gram stats file"):
        load_fisher(gram)
    bad = {"fisher:weight": -torch.ones(2, 2), "fisher:bias": torch.ones(2)}
    save_file(bad, str(tmp_path / "neg.safetensors"), metadata=meta)
    with pytest.raises(FeatureError, match="'fisher:weight' has NaN/Inf or negative"):
        load_fisher(tmp_path / "neg.safetensors").tensor("fisher:weight")
    save_file({"fisher:weight": torch.ones(2, 2, dtype=torch.float64)},
              str(tmp_path / "f64.safetensors"), metadata=meta)
    with pytest.raises(FeatureError, match="expected a non-empty float32"):
        load_fisher(tmp_path / "f64.safetensors")
    save_file({"fisher:bias": torch.ones(2)}, str(tmp_path / "nan.safetensors"),
              metadata={**meta, "fisher_norm": "nan"})
    with pytest.raises(FeatureError, match="'fisher_norm' is not a finite number"):
        load_fisher(tmp_path / "nan.safetensors")


def test_models_it_cannot_take_are_one_line_errors() -> None:
    with pytest.raises(FeatureError, match="regression head"):
        fisher_capture(nn.Linear(2, 1), [torch.ones(1, 2)])
    with pytest.raises(FeatureError, match="head returning logits"):
        fisher_capture(nn.Sequential(nn.Linear(2, 2), nn.Flatten(0)), [torch.ones(1, 2)])
    with pytest.raises(FeatureError, match="use labels: sample"):
        fisher_capture(nn.Linear(2, 2000), [torch.ones(1, 2)], labels="expected")
    table = torch.zeros(3, 3)
    with pytest.raises(FeatureError, match="no calibration prediction"):
        fisher_capture(Bigram(table), [{"input_ids": torch.zeros(1, 2, dtype=torch.long),
                                        "attention_mask": torch.zeros(1, 2, dtype=torch.long)}])
    with pytest.raises(FeatureError, match="calibration.labels 'mode'"):
        fisher_capture(nn.Linear(2, 2), [torch.ones(1, 2)], labels="mode")


FACTORY = '''
from torch import nn


def build():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
'''


def test_reuse_compares_the_label_mode(tmp_path: Path) -> None:
    (tmp_path / "fisher_test_factory.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    save_file({n: v.detach() for n, v in net.state_dict().items()}, str(tmp_path / "a.safetensors"))
    torch.save(torch.randn(6, 3), tmp_path / "a.pt")

    def plan(labels: str):
        entry = {"model": "a.safetensors", "name": "a", "features": "stats/a.safetensors",
                 "calibration": {"data": "a.pt", "num_examples": 6, "batch_size": 4,
                                 "factory": "fisher_test_factory:build", "labels": labels}}
        rec = parse_recipe({"merge_method": "fisher", "models": [entry]})
        return plan_sources(rec, tmp_path, [tmp_path / "a.safetensors"])

    (stats,), (report,) = obtain(plan("argmax"), seed=0, root=tmp_path, kind=FISHER)
    assert report.examples == 6 and report.rows == 6 and report.layers == 4
    assert stats.metadata["labels"] == "argmax"
    (again,), reports = obtain(plan("argmax"), seed=0, root=tmp_path, kind=FISHER)
    assert reports == [] and torch.equal(again.tensor("fisher:2.bias"), stats.tensor("fisher:2.bias"))
    with pytest.raises(FeatureError, match=r"\(labels differ\)"):
        obtain(plan("expected"), seed=0, root=tmp_path, kind=FISHER)


@pytest.mark.parametrize("command", ["features", "merge"])
@pytest.mark.parametrize(("option", "value"), [("blocks_per_pass", 2), ("accumulate", "float32")])
def test_gram_capture_options_are_refused_by_both_commands(tmp_path: Path, command: str,
                                                           option: str, value: object) -> None:
    # `mergewise features` and `merge` alike: one line naming the entry, before any capture
    # (no calibration data exists, so a capture would fail on that instead)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    save_file({n: v.detach() for n, v in net.state_dict().items()}, str(tmp_path / "a.safetensors"))
    cal = {"data": "absent.pt", "factory": "fisher_test_factory:build"}
    models = [{"model": "a.safetensors", "name": "a", "features": "stats/a.safetensors",
               "calibration": dict(cal)},
              {"model": "a.safetensors", "name": "b", "features": "stats/b.safetensors",
               "calibration": {**cal, option: value}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"merge_method": "fisher", "models": models}))
    args = ["--out", tmp_path / "out"] if command == "merge" else []
    result = run_cli(command, tmp_path / "r.yaml", *args)
    assert_one_line_error(result, f"models.1.calibration.{option}: merge_method fisher does not "
                                  "honour it", "remove the option")
    assert not (tmp_path / "stats").exists() and not (tmp_path / "out").exists()
