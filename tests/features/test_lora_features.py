"""Data-aware methods take LoRA adapters as they take full fine-tunes: the expert whose
features are captured is its base with the adapter applied (``calibration._with_adapter``),
so LOT, RegMean and Fisher on adapters give exactly the merge of the equivalent full
fine-tunes (base + scale * B @ A written out), through the recipe and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_lora_inputs import write_adapter

from mergewise import FeatureError, merge
from mergewise.checkpoint import open_checkpoint
from mergewise.features.calibration import load_module
from mergewise.lora import PREFIX, LoraCheckpoint

transformers = pytest.importorskip("transformers")

VOCAB = 40
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.0.mlp.down_proj")


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, two adapters on it, their full fine-tunes, calibration token ids."""
    root = tmp_path_factory.mktemp("lora-features")
    base = tiny_lm()
    base.save_pretrained(str(root / "base"))
    state = base.state_dict()
    g = torch.Generator().manual_seed(4)
    for k in range(2):
        mods = {}
        for m in MODULES:
            out, inp = state[f"{m}.weight"].shape
            mods[m] = (torch.randn(4, inp, generator=g) * 0.3, torch.randn(out, 4, generator=g) * 0.3)
        norm = torch.randn(8, generator=g) * 0.1 + 1.0
        write_adapter(root / f"ad{k}", mods, {"modules_to_save": ["norm"]},
                      {f"{PREFIX}model.norm.weight": norm})
        with open_checkpoint(root / "base") as b, LoraCheckpoint(root / f"ad{k}", b) as ck:
            full = tiny_lm()
            with torch.no_grad():
                for name, t in full.state_dict().items():
                    if name in ck.names():
                        t.copy_(ck.read(name))
        full.save_pretrained(str(root / f"full{k}"))
        ids = torch.randint(1, VOCAB, (6, 7), generator=g)
        mask = torch.ones(6, 7, dtype=torch.long)
        mask[1, 4:] = 0
        ids[mask == 0] = 0
        torch.save({"input_ids": ids, "attention_mask": mask}, root / f"t{k}.pt")
    return root


def recipe(root: Path, method: str, kind: str, plus: bool = False) -> Path:
    def model(k: int) -> str:
        if kind == "full":
            return f"full{k}"
        return f"base+ad{k}" if plus else f"ad{k}"

    data = {"merge_method": method, "base_model": "base",
            "models": [{"model": model(k), "calibration": {"data": f"t{k}.pt", "num_examples": 6}}
                       for k in range(2)]}
    if method == "fisher":
        del data["base_model"]
        data["parameters"] = {"normalize": False}
        if kind != "full" and not plus:  # an adapter entry needs the model it applies to
            for k, m in enumerate(data["models"]):
                m["model"] = f"base+ad{k}"
    path = root / f"{method}-{kind}-{plus}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_adapter_module_is_its_base_with_the_adapter_applied(family: Path) -> None:
    got = load_module(family / "ad0", adapter_base=family / "base").state_dict()
    want = load_module(family / "full0").state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_an_adapter_without_the_model_it_applies_to_is_one_line(family: Path) -> None:
    with pytest.raises(FeatureError, match="is a LoRA adapter; its features need the model"):
        load_module(family / "ad0")


@pytest.mark.parametrize(("method", "plus"), [("lot", False), ("lot", True),
                                              ("regmean", False), ("fisher", True)])
def test_adapters_merge_as_their_full_fine_tunes(family: Path, tmp_path: Path, method: str,
                                                 plus: bool) -> None:
    """The same features (the module is the full fine-tune, bit for bit, above), so RegMean and
    Fisher, which read weights, give the same bits; LOT reads task vectors, and an adapter's is
    scale * B @ A exactly where the full fine-tune's is (base + it) - base, rounded: the
    merges agree to float32 rounding."""
    merge(recipe(family, method, "adapter", plus), tmp_path / "a")
    merge(recipe(family, method, "full"), tmp_path / "f")
    with open_checkpoint(tmp_path / "a") as a, open_checkpoint(tmp_path / "f") as f:
        assert sorted(a.names()) == sorted(f.names())
        for name in f.names():
            if method == "lot":
                torch.testing.assert_close(a.read(name), f.read(name), rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a.read(name), f.read(name)), name
    report = (tmp_path / "a" / "report.json").read_text()
    assert "ad0" in report


def test_mergewise_features_on_adapters_writes_the_full_fine_tunes_stats(family: Path,
                                                                        tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mergewise.api import compute_features

    compute_features(recipe(family, "lot", "adapter"), tmp_path / "a")
    compute_features(recipe(family, "lot", "full"), tmp_path / "f")
    a_files = sorted((tmp_path / "a").glob("*.safetensors"))
    f_files = sorted((tmp_path / "f").glob("*.safetensors"))
    assert len(a_files) == len(f_files) == 2
    for fa, ff in zip(a_files, f_files, strict=True):
        ta, tf = load_file(fa), load_file(ff)
        assert sorted(ta) == sorted(tf) and any(k.startswith("gram:") for k in tf)
        assert all(torch.equal(ta[k], tf[k]) for k in tf)
