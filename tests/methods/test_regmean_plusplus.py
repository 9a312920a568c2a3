"""RegMean++: RegMean's solve on Grams captured through the already merged blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from mergewise import METHODS, FeatureError, merge, merge_state_dicts
from mergewise.checkpoint import open_checkpoint
from mergewise.features import capture
from mergewise.features.sequential import block_names, capture_sequential
from mergewise.methods.regmean import regmean_merge

TOY = '''
import torch
from torch import nn


class Toy(nn.Module):
    """Two 1x1 blocks: y = b * (a * x)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build():
    return Toy()
'''


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_zoo(tmp_path: Path) -> Path:
    (tmp_path / "rmpp_toy_factory.py").write_text(TOY)
    for k, (a, b, x) in enumerate([(1.0, 1.0, 1.0), (3.0, 5.0, 2.0)]):
        save_file({"layers.0.weight": torch.tensor([[a]]), "layers.1.weight": torch.tensor([[b]])},
                  str(tmp_path / f"e{k}.safetensors"))
        torch.save(torch.tensor([[x]]), tmp_path / f"x{k}.pt")
    return tmp_path


def toy_recipe(root: Path, method: str, **extra: object) -> Path:
    models = [{"model": f"e{k}.safetensors", "calibration": {
        "data": f"x{k}.pt", "num_examples": 1, "factory": "rmpp_toy_factory:build"}}
        for k in range(2)]
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump({"merge_method": method, "models": models,
                                    "dtype": "float64", **extra}))
    return path


def test_registration_reuses_the_regmean_solve() -> None:
    m = METHODS.get("regmean_plusplus")
    assert m.func is regmean_merge
    assert m.space == "weight" and m.features and m.sequential_features and not m.requires_base
    assert not m.accepts_sparsify
    assert [(p.name, p.default) for p in m.params] == [("alpha", 0.95)]


def test_the_toy_example_through_a_factory_recipe(tmp_path: Path) -> None:
    # the note's toy: block 1 a* = 13/5 for both; block 2 RegMean 181/37, RegMean++ 21/5
    root = toy_zoo(tmp_path)
    got = {}
    for method in ("regmean", "regmean_plusplus"):
        out = merge(toy_recipe(root, method), root / f"out-{method}").out
        with open_checkpoint(out) as ckpt:
            got[method] = (float(ckpt.read("layers.0.weight")), float(ckpt.read("layers.1.weight")))
    assert got["regmean"][0] == pytest.approx(2.6, abs=1e-6)
    assert got["regmean_plusplus"][0] == pytest.approx(2.6, abs=1e-6)
    assert got["regmean"][1] == pytest.approx(181 / 37, abs=1e-6)
    assert got["regmean_plusplus"][1] == pytest.approx(4.2, abs=1e-6)


def test_stats_files_and_filter_alphas_are_refused(tmp_path: Path) -> None:
    from mergewise import RecipeError
    from mergewise.api import compute_features

    root = toy_zoo(tmp_path)
    path = toy_recipe(root, "regmean_plusplus")
    data = yaml.safe_load(path.read_text())
    data["models"][0]["features"] = "s.safetensors"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FeatureError, match=r"reads no stats file: remove models\.0\.features"):
        merge(path, root / "out")
    with pytest.raises(FeatureError, match="captured during `mergewise merge`"):
        compute_features(path)
    bad = toy_recipe(root, "regmean_plusplus",
                     parameters={"alpha": [{"filter": "layers.0", "value": 0.5}, {"value": 1.0}]})
    with pytest.raises(RecipeError, match="alpha must be one number"):
        merge(bad, root / "out2")


class Net(nn.Module):
    """A stem, ``blocks`` of (Linear, LayerNorm, Linear) and a head."""

    def __init__(self, n_blocks: int):
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(),
                                                  nn.Linear(5, 4)) for _ in range(n_blocks))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def zoo(n_blocks: int, n_experts: int) -> tuple[dict[str, Net], dict[str, list[torch.Tensor]]]:
    torch.manual_seed(0)
    base = Net(n_blocks).double()
    experts, batches = {}, {}
    g = torch.Generator().manual_seed(1)
    for k in range(n_experts):
        e = Net(n_blocks).double()
        e.load_state_dict({n: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                           for n, v in base.state_dict().items()})
        experts[f"t{k}"] = e.eval()
        batches[f"t{k}"] = [torch.randn(6, 3, generator=g, dtype=torch.float64) + k
                            for _ in range(2)]
    return experts, batches


def sds(experts: dict[str, Net]) -> dict[str, dict[str, torch.Tensor]]:
    return {t: {n: v.detach().clone() for n, v in e.state_dict().items()}
            for t, e in experts.items()}


def test_block_names() -> None:
    assert block_names(Net(3)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert block_names(nn.Sequential(nn.Linear(2, 2))) == []


def test_one_block_equals_regmean() -> None:
    # outside the blocks (stem, head) RegMean++ is RegMean; block 0 sees the merged stem, so
    # with experts sharing their stem it sees each expert's own inputs: the whole merge equal
    experts, batches = zoo(1, 3)
    seq = capture_sequential(experts, batches)
    plain = {t: capture(e, batches[t], label=t) for t, e in experts.items()}
    pp = merge_state_dicts(None, sds(experts), "regmean_plusplus", features=seq, dtype="float64")
    rm = merge_state_dicts(None, sds(experts), "regmean", features=plain, dtype="float64")
    assert torch.allclose(pp["stem.weight"], rm["stem.weight"])
    assert torch.allclose(pp["head.weight"], rm["head.weight"])
    shared = sds(experts)
    for sd in shared.values():
        sd["stem.weight"], sd["stem.bias"] = shared["t0"]["stem.weight"], shared["t0"]["stem.bias"]
    for t, e in experts.items():
        e.load_state_dict(shared[t])
    seq = capture_sequential(experts, batches)
    plain = {t: capture(e, batches[t], label=t) for t, e in experts.items()}
    pp = merge_state_dicts(None, shared, "regmean_plusplus", features=seq, dtype="float64")
    rm = merge_state_dicts(None, shared, "regmean", features=plain, dtype="float64")
    assert pp.keys() == rm.keys()
    for n in pp:
        torch.testing.assert_close(pp[n], rm[n], rtol=1e-10, atol=1e-12)


def test_one_expert_is_that_expert() -> None:
    experts, batches = zoo(3, 1)
    seq = capture_sequential(experts, batches)
    out = merge_state_dicts(None, sds(experts), "regmean_plusplus", features=seq, dtype="float64")
    for n, v in experts["t0"].state_dict().items():
        torch.testing.assert_close(out[n], v, rtol=1e-9, atol=1e-10)


def test_later_blocks_see_the_merged_prefix() -> None:
    # block 1's Gram is the Gram of block 1's input in the merged model (blocks.0 merged)
    experts, batches = zoo(2, 2)
    seq = capture_sequential(experts, batches, alpha=0.95)
    merged = Net(2).double()
    merged.load_state_dict(merge_state_dicts(None, sds(experts), "regmean_plusplus",
                                             features=seq, dtype="float64"))
    merged.eval()
    for t, e in experts.items():
        merged.blocks[1] = e.blocks[1]  # expert t's own block 1 on the merged prefix
        want = capture(merged, batches[t], label=t)
        torch.testing.assert_close(seq[t].gram("blocks.1.0"), want.gram("blocks.1.0"))
        torch.testing.assert_close(seq[t].gram("blocks.1.3"), want.gram("blocks.1.3"))
        own = capture(e, batches[t], label=t)  # the stem and head: each expert's own run
        torch.testing.assert_close(seq[t].gram("head"), own.gram("head"))
        assert not torch.allclose(seq[t].gram("blocks.1.0"), own.gram("blocks.1.0"))


def test_a_tiny_bert_merged_through_the_cli_loads_back(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from mergewise.cli import app

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, type_vocab_size=1)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg).eval()
    assert block_names(base) == ["encoder.layer.0", "encoder.layer.1"]
    g = torch.Generator().manual_seed(2)
    models = []
    for k in range(2):
        e = transformers.BertModel(cfg)
        e.load_state_dict({n: v + 0.05 * torch.randn(v.shape, generator=g)
                           if v.is_floating_point() else v for n, v in base.state_dict().items()})
        e.save_pretrained(str(tmp_path / f"e{k}"))
        torch.save({"input_ids": torch.randint(1, 40, (6, 8), generator=g),
                    "attention_mask": torch.ones(6, 8, dtype=torch.long)}, tmp_path / f"x{k}.pt")
        models.append({"model": f"e{k}", "calibration": {"data": f"x{k}.pt", "num_examples": 6,
                                                          "batch_size": 3}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"merge_method": "regmean_plusplus", "models": models}))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged = transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval()
    out = merged(input_ids=torch.randint(1, 40, (2, 8), generator=g)).last_hidden_state
    assert torch.isfinite(out).all()
    with open_checkpoint(tmp_path / "out") as ckpt:  # block linears solved, not averaged
        q = "encoder.layer.1.attention.self.query.weight"
        e0, e1 = (transformers.BertModel.from_pretrained(str(tmp_path / f"e{k}"))
                  .state_dict()[q] for k in range(2))
        assert not torch.allclose(ckpt.read(q), (e0 + e1) / 2)


def test_float32_accumulation_by_hand_through_a_recipe(tmp_path: Path) -> None:
    # the toy with x = 1 and 3: block 0's Grams 1 and 9 (exact either way), a* = 28/10; block
    # 1's inputs are fl32(a*)·x in the float32 forward. float32 sums round each Gram to float32;
    # the solve stays float64: b* = (1·G0 + 5·G1) / (G0 + G1) with those Grams
    root = toy_zoo(tmp_path)
    torch.save(torch.tensor([[3.0]]), root / "x1.pt")
    got, grams = {}, {}
    for dtype in ("float64", "float32"):
        path = toy_recipe(root, "regmean_plusplus")
        data = yaml.safe_load(path.read_text())
        for m in data["models"]:
            m["calibration"]["accumulate"] = dtype
        path.write_text(yaml.safe_dump(data))
        result = merge(path, root / f"out-{dtype}")
        with open_checkpoint(result.out) as ckpt:
            assert float(ckpt.read("layers.0.weight")) == pytest.approx(2.8, rel=1e-15)
            got[dtype] = float(ckpt.read("layers.1.weight"))
        report = json.loads((result.out / "report.json").read_text())
        assert [f["calibration"].get("accumulate", "float64") for f in report["features"]] == [dtype] * 2
        x = torch.tensor([1.0, 3.0]) * torch.tensor(2.8, dtype=torch.float32)  # fl32 inputs
        grams[dtype] = (x.double() ** 2) if dtype == "float64" else (x * x).double()
    for dtype, g in grams.items():
        assert got[dtype] == pytest.approx(float((g[0] + 5 * g[1]) / (g[0] + g[1])), rel=1e-15)
    assert not torch.equal(grams["float32"], grams["float64"])  # the rounding is real
    assert got["float32"] != got["float64"]
    assert got["float32"] == pytest.approx(got["float64"], rel=2 ** -22)  # float32 rounding only


def test_float32_sums_per_task_differ_from_float64_by_rounding_only() -> None:
    experts, batches = zoo(2, 2)
    ref = capture_sequential(experts, batches)
    mixed = capture_sequential(experts, batches, accumulate={"t0": "float32"})
    assert mixed["t0"].metadata["accumulate"] == "float32" and "accumulate" not in mixed["t1"].metadata
    assert mixed["t0"].keys() == ref["t0"].keys()
    for layer in ("stem", "blocks.0.0", "blocks.1.0", "blocks.1.3", "head"):  # plain and sequential
        g32, g64 = mixed["t0"].gram(layer), ref["t0"].gram(layer)
        assert g32.dtype == torch.float32 and g64.dtype == torch.float64
        torch.testing.assert_close(g32.double(), g64, rtol=1e-6, atol=1e-6)
        assert not torch.equal(g32.double(), g64)
        t1 = mixed["t1"].gram(layer)
        assert t1.dtype == torch.float64  # t1's own sums stay float64
        if layer in ("stem", "head"):  # t1's own end-to-end run
            assert torch.equal(t1, ref["t1"].gram(layer))
        else:  # its blocks see the prefix merged from t0's float32 Grams too
            torch.testing.assert_close(t1, ref["t1"].gram(layer), rtol=1e-6, atol=1e-6)


def test_blocks_per_pass_is_refused_before_any_model_is_loaded(tmp_path: Path) -> None:
    from mergewise import RecipeError

    root = toy_zoo(tmp_path)
    path = toy_recipe(root, "regmean_plusplus")
    data = yaml.safe_load(path.read_text())
    data["models"][1]["calibration"].update(blocks_per_pass=1, data="absent.pt")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"^models\.1\.calibration\.blocks_per_pass: merge_method "
                                          r"regmean_plusplus does not honour it .*holds every "
                                          r"expert's Grams of every block in memory"):
        merge(path, root / "out")
    assert not (root / "out").exists()
