"""Side by side with PEFT on a tiny real transformers Llama (skipped without peft): adapters
made by ``get_peft_model`` are read as PEFT applies them, and a merge written with
``--out-format lora`` loads with ``PeftModel.from_pretrained`` and compares with PEFT's own
``add_weighted_adapter(combination_type="svd")``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_helpers import write_recipe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mergewise import merge  # noqa: E402
from mergewise.checkpoint import open_checkpoint  # noqa: E402
from mergewise.lora import LoraCheckpoint  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def make_adapter(base_dir: Path, out: Path, seed: int, **config) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                          **config)  # random B: a non-zero delta
    peft.get_peft_model(model, cfg).save_pretrained(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    tiny_llama().save_pretrained(root / "base")
    make_adapter(root / "base", root / "a", 1)
    make_adapter(root / "base", root / "b", 2, use_rslora=True,
                 rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 16})
    return root


def peft_model(root: Path, *names: str):
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    pm = peft.PeftModel.from_pretrained(model, root / names[0], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(root / n, adapter_name=n)
    return pm.eval()


def test_reader_gives_peft_merge_and_unload_weights(setup: Path) -> None:
    """Our full weights of each adapter = PEFT's merge_and_unload (rslora, patterns included)."""
    for name in ("a", "b"):
        merged = peft_model(setup, name).merge_and_unload().state_dict()
        with open_checkpoint(setup / "base") as b, LoraCheckpoint(setup / name, b) as ck:
            for key in ck.names():
                torch.testing.assert_close(ck.read(key), merged[key], rtol=0, atol=1e-6)


def test_lora_out_vs_peft_svd_and_loads_in_peft(setup: Path, tmp_path: Path) -> None:
    """task_arithmetic, weights [0.5, 0.5], lambda 1 is PEFT's svd combination's delta:
    0.5 D_a + 0.5 D_b. At rank 8 (the sum of the ranks) both are exact; at rank 2 both truncate
    the same spectrum. PeftModel loads our adapter and gives the logits of the full merge."""
    recipe = {"merge_method": "task_arithmetic", "base_model": str(setup / "base"),
              "models": [{"model": str(setup / n), "parameters": {"weight": 0.5}} for n in "ab"],
              "parameters": {"lambda": 1.0}}
    r = write_recipe(tmp_path / "r.yaml", recipe)
    merge(r, tmp_path / "full")
    numbers = {}
    for rank in (8, 2):
        out = tmp_path / f"lora{rank}"
        result = merge(r, out, out_format="lora", lora_rank=rank)
        pm = peft_model(setup, "a", "b")
        pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "svd", combination_type="svd",
                                svd_rank=rank)
        ours = {m["module"]: m for m in json.loads(
            (out / "report.json").read_text())["lora"]["per_module"]}
        worst_vs_peft, worst_peft_err = 0.0, 0.0
        for module, row in ours.items():
            layer = pm.get_submodule(f"base_model.model.{module}")
            exact = 0.5 * layer.get_delta_weight("a") + 0.5 * layer.get_delta_weight("b")
            theirs = layer.get_delta_weight("svd")
            with open_checkpoint(setup / "base") as b, LoraCheckpoint(out, b) as ck:
                mine = ck.low_rank[f"{module}.weight"].delta(ck.weights, torch.float32,
                                                            torch.device("cpu"))
            peft_err = float((theirs - exact).norm() / exact.norm())
            assert abs(float((mine - exact).norm() / exact.norm()) - row["relative_error"]) < 1e-4
            worst_vs_peft = max(worst_vs_peft, float((mine - theirs).norm() / exact.norm()))
            worst_peft_err = max(worst_peft_err, peft_err)
            assert row["relative_error"] <= peft_err + 1e-5  # the same optimal truncation
        numbers[rank] = (result.lora["relative_error_max"], worst_peft_err, worst_vs_peft)
        assert worst_vs_peft < (1e-5 if rank == 8 else 1e-4)
        # PEFT loads our adapter; its logits are those of the full-weights merge
        model = transformers.LlamaForCausalLM.from_pretrained(setup / "base")
        loaded = peft.PeftModel.from_pretrained(model, out).eval()
        full = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full").eval()
        ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = loaded(input_ids=ids).logits, full(input_ids=ids).logits
        if rank == 8:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        else:  # truncated: close to the full merge, as close as PEFT's own rank-2 adapter
            pm.set_adapter("svd")
            with torch.no_grad():
                peft_logits = pm(input_ids=ids).logits
            ours_gap = float((got - want).norm() / want.norm())
            peft_gap = float((peft_logits - want).norm() / want.norm())
            assert ours_gap < 2 * peft_gap + 1e-6
            numbers["logits_gap_rank2"] = (ours_gap, peft_gap)
    print("side by side (ours max rel err, PEFT max rel err, max |ours-PEFT|/|delta|):", numbers)
