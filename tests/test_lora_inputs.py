"""LoRA adapters as merge inputs (mergewise.lora), without peft: adapter files are written here
in PEFT's exact layout (adapter_config.json + adapter_model.safetensors / .bin)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import edit_weights, load_dir, make_family, write_recipe
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergewise import merge
from mergewise.checkpoint import open_checkpoint
from mergewise.errors import CheckpointError, RecipeError
from mergewise.inputs import open_inputs
from mergewise.lora import PREFIX, LoraCheckpoint, pattern_key, read_adapter_config

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"
DOWN = "model.layers.0.mlp.down_proj"


def write_adapter(directory: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  config: dict[str, Any] | None = None,
                  extra: dict[str, torch.Tensor] | None = None, fmt: str = "safetensors") -> Path:
    """A PEFT adapter directory: ``modules`` maps a module to its (A, B)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted(
        {m.rsplit(".", 1)[-1] for m in modules}), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "base_model_name_or_path": None, "task_type": "CAUSAL_LM"}
    cfg.update(config or {})
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    tensors.update(extra or {})
    if fmt == "safetensors":
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(tensors, directory / "adapter_model.bin")
    return directory


def dyadic(shape: tuple[int, ...], gen: torch.Generator, steps: int = 4) -> torch.Tensor:
    """Small multiples of 1/steps: every sum and product below is exact in float32."""
    return torch.randint(-steps, steps + 1, shape, generator=gen).float() / steps


@pytest.fixture
def fam(tmp_path: Path):
    """A float32 family whose base is rounded to multiples of 1/64 (exact arithmetic)."""
    family = make_family(tmp_path / "fam", dtype=torch.float32)

    def rounded(t: dict[str, torch.Tensor]) -> None:
        for k, v in t.items():
            t[k] = torch.round(v * 64) / 64
    edit_weights(family.base, rounded)
    return family


def lora_pair(base: dict[str, torch.Tensor], module: str, r: int, gen: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = base[f"{module}.weight"].shape
    return dyadic((r, inp), gen), dyadic((out, r), gen)


def adapters_and_fulls(fam, tmp_path: Path, n: int = 2) -> tuple[list[Path], list[Path]]:
    """``n`` adapters and, for each, the full fine-tune base + scale * B @ A (exact)."""
    base = load_file(fam.base / "model.safetensors")
    adapters, fulls = [], []
    for i in range(n):
        gen = torch.Generator().manual_seed(10 + i)
        mods = {m: lora_pair(base, m, 4, gen) for m in (Q, V, DOWN)}
        head = torch.round(torch.randn(base["lm_head.weight"].shape, generator=gen) * 64) / 64
        adapters.append(write_adapter(tmp_path / f"ad{i}", mods,
                                      {"modules_to_save": ["lm_head"]},
                                      {f"{PREFIX}lm_head.weight": head}))
        full = dict(base)
        for m, (a, b) in mods.items():
            full[f"{m}.weight"] = base[f"{m}.weight"] + (b @ a) * 2.0
        full["lm_head.weight"] = head
        d = tmp_path / f"full{i}"
        d.mkdir()
        save_file(full, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text((fam.base / "config.json").read_text())
        fulls.append(d)
    return adapters, fulls


RECIPES = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.1},
}


@pytest.mark.parametrize("method", [*RECIPES, "ties+tadrop", "emr"])
def test_adapter_task_vectors_equal_the_full_fine_tunes(fam, tmp_path: Path, method: str) -> None:
    """Every method (and TADrop) merges adapters exactly as the full fine-tunes base +
    scale * B @ A they stand for: the output files hold the same bits."""
    adapters, fulls = adapters_and_fulls(fam, tmp_path)
    name = method.split("+")[0]
    outs = []
    for kind, models in (("lora", adapters), ("full", fulls)):
        recipe: dict[str, Any] = {
            "merge_method": name, "base_model": str(fam.base), "seed": 5,
            "models": [{"model": str(m), "parameters": {"weight": w}}
                       for m, w in zip(models, [0.6, 1.4], strict=True)]}
        if name == "emr":
            recipe["models"] = [{"model": str(m), "name": f"t{i}"} for i, m in enumerate(models)]
        else:
            recipe["parameters"] = dict(RECIPES[name])
        if method.endswith("tadrop"):
            recipe["parameters"].pop("density")
            recipe["sparsify"] = {"method": "tadrop", "drop_rate": 0.6}
        out = tmp_path / f"out_{kind}"
        merge(write_recipe(tmp_path / f"{kind}.yaml", recipe), out)
        outs.append(out)
    a, b = load_dir(outs[0]), load_dir(outs[1])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if name == "emr":
        ma = load_file(outs[0] / "modulators.safetensors")
        mb = load_file(outs[1] / "modulators.safetensors")
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_task_vector_is_scale_b_a_exactly_even_on_a_bf16_base(tmp_path: Path) -> None:
    """The task vector is (B @ A) * scale in the compute dtype, not (W0 + delta) - W0: on a
    bfloat16 base, W0 + delta rounded to bf16 would lose most of a small LoRA update."""
    fam = make_family(tmp_path / "fam", dtype=torch.bfloat16)
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    out_dim, in_dim = base[f"{Q}.weight"].shape
    a, b = torch.randn(4, in_dim, generator=gen) * 1e-3, torch.randn(out_dim, 4, generator=gen)
    ad = write_adapter(tmp_path / "ad", {Q: (a, b)}, {"lora_alpha": 16})
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
              "models": [{"model": str(ad)}], "parameters": {"lambda": 1.0},
              "out_dtype": "float32"}
    merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    got = load_dir(tmp_path / "out")
    w0 = base[f"{Q}.weight"].float()
    assert torch.equal(got[f"{Q}.weight"], w0 + (b @ a) * 4.0)
    rounded = (w0 + (b @ a) * 4.0).bfloat16().float() - w0
    assert (rounded - (b @ a) * 4.0).abs().max() > 1e-4  # what a bf16 round trip would lose
    for k, v in base.items():  # everything else is the base, bit for bit
        if k != f"{Q}.weight":
            assert torch.equal(got[k], v.float()), k


def test_full_weights_scales_rslora_patterns_and_fan_in_fan_out(tmp_path: Path) -> None:
    """read() gives W0 + delta with PEFT's scale rules: alpha/r, alpha/sqrt(r) (rslora), per
    module r and alpha from rank_pattern / alpha_pattern (first matching key, PEFT's regex)."""
    fam = make_family(tmp_path / "fam", dtype=torch.float32)
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    pairs = {Q: lora_pair(base, Q, 2, gen), V: lora_pair(base, V, 4, gen),
             DOWN: lora_pair(base, DOWN, 4, gen)}
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.0.self_attn.q_proj": 2},
           "alpha_pattern": {"v_proj": 3, "proj": 100}}
    for rslora in (False, True):
        ad = write_adapter(tmp_path / f"ad{rslora}", pairs, {**cfg, "use_rslora": rslora})
        with open_checkpoint(fam.base) as b, LoraCheckpoint(ad, b) as ck:
            expect = {Q: (2, 8), V: (4, 3), DOWN: (4, 8)}
            for m, (r, alpha) in expect.items():
                scale = alpha / (math.sqrt(r) if rslora else r)
                a, bb = pairs[m]
                assert ck.low_rank[f"{m}.weight"].scale == scale
                assert torch.equal(ck.read(f"{m}.weight"), base[f"{m}.weight"] + (bb @ a) * scale)
            assert torch.equal(ck.read("model.norm.weight"), base["model.norm.weight"])
            assert ck.info(f"{Q}.weight").dtype == torch.float32
    # fan_in_fan_out: the base stores (in, out) (GPT-2's Conv1D); delta = (B @ A).T
    w = base[f"{Q}.weight"]
    tall = {k: v for k, v in base.items()}
    tall[f"{Q}.weight"] = w.T.contiguous()
    conv = tmp_path / "conv"
    conv.mkdir()
    save_file(tall, conv / "model.safetensors")
    a, bb = torch.randn(4, w.shape[1], generator=gen), torch.randn(w.shape[0], 4, generator=gen)
    ad = write_adapter(tmp_path / "adf", {Q: (a, bb)}, {"fan_in_fan_out": True})
    with open_checkpoint(conv) as b, LoraCheckpoint(ad, b) as ck:
        assert torch.equal(ck.read(f"{Q}.weight"), w.T + (bb @ a).T * 2.0)


def test_embedding_lora_lora_bias_and_bin_format(tmp_path: Path) -> None:
    """lora_embedding_A/B: delta = (B @ A).T * scale; lora_B.bias adds bias * scale (an
    attention bias here); adapter_model.bin is read with weights_only."""
    fam = make_family(tmp_path / "fam", dtype=torch.float32)

    def with_bias(t: dict[str, torch.Tensor]) -> None:
        t[f"{Q}.bias"] = torch.randn(t[f"{Q}.weight"].shape[0])
    edit_weights(fam.base, with_bias)
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(2)
    vocab, hidden = base["model.embed_tokens.weight"].shape
    ea, eb = torch.randn(4, vocab, generator=gen), torch.randn(hidden, 4, generator=gen)
    a, b = lora_pair(base, Q, 4, gen)
    bias = torch.randn(b.shape[0], generator=gen)
    extra = {f"{PREFIX}model.embed_tokens.lora_embedding_A": ea,
             f"{PREFIX}model.embed_tokens.lora_embedding_B": eb,
             f"{PREFIX}{Q}.lora_B.bias": bias}
    ad = write_adapter(tmp_path / "ad", {Q: (a, b)}, {"lora_bias": True}, extra, fmt="bin")
    with open_checkpoint(fam.base) as bc, LoraCheckpoint(ad, bc) as ck:
        assert torch.equal(ck.read("model.embed_tokens.weight"),
                           base["model.embed_tokens.weight"] + (eb @ ea).T * 2.0)
        assert torch.equal(ck.read(f"{Q}.bias"), base[f"{Q}.bias"] + bias * 2.0)
        assert torch.equal(ck.delta_over(bc, f"{Q}.bias", torch.float32, torch.device("cpu")),
                           bias * 2.0)


def test_mergekit_plus_syntax_and_base_layer_keys(fam, tmp_path: Path) -> None:
    """``model: base+adapter`` (mergekit) is the same input as ``model: adapter``; full
    tensors saved under PEFT's base_layer / modules_to_save names replace the base's."""
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    norm = torch.full_like(base["model.norm.weight"], 0.5)
    ad = write_adapter(tmp_path / "ad", {V: lora_pair(base, V, 4, gen)}, None,
                       {f"{PREFIX}model.norm.modules_to_save.weight": norm})
    outs = []
    for i, text in enumerate((str(ad), f"{fam.base}+{ad}", f"{fam.experts[0]}+{ad}")):
        recipe = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
                  "models": [{"model": text}]}
        merge(write_recipe(tmp_path / f"r{i}.yaml", recipe), tmp_path / f"o{i}")
        outs.append(load_dir(tmp_path / f"o{i}"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert torch.equal(outs[0]["model.norm.weight"], norm)
    # on another model, the adapter's model is that model + delta
    expert = load_dir(fam.experts[0])
    q = f"{Q}.weight"
    assert torch.equal(outs[2][q], base[q] + (expert[q] - base[q]))


def test_baseless_slerp_of_plus_entries_keeps_the_models_files(fam, tmp_path: Path) -> None:
    """SLERP has no base: its first model, ``base+adapter``, is the reference, and its HF files
    are the model's (an adapter directory holds none), overridden by any the adapter has."""
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    ads = [write_adapter(tmp_path / f"ad{i}", {V: lora_pair(base, V, 4, gen)}) for i in range(2)]
    recipe = {"merge_method": "slerp", "parameters": {"t": 0.5},
              "models": [{"model": f"{fam.base}+{ad}"} for ad in ads]}
    merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "o")
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "o" / name).read_bytes() == (fam.base / name).read_bytes(), name
    (ads[0] / "generation_config.json").write_text('{"eos_token_id": 7}')
    merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "o2")
    assert json.loads((tmp_path / "o2" / "generation_config.json").read_text()) == {
        "eos_token_id": 7}


def write_bad(tmp_path: Path, fam, config: dict[str, Any] | None = None,
              extra: dict[str, torch.Tensor] | None = None,
              modules: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    mods = modules if modules is not None else {Q: lora_pair(base, Q, 4, gen)}
    return write_adapter(tmp_path / "bad", mods, config, extra)


@pytest.mark.parametrize(("config", "extra", "expected"), [
    ({"peft_type": "IA3"}, None, r"peft_type \"IA3\" is not supported \(IA3 rescales"),
    ({"peft_type": "LOHA"}, None, "peft_type \"LOHA\" is not supported"),
    ({"peft_type": "LOKR"}, None, "peft_type \"LOKR\" is not supported"),
    ({"peft_type": "ADALORA"}, None, "AdaLoRA"),
    ({"peft_type": "PROMPT_TUNING"}, None, "prompt tuning"),
    ({"use_dora": True}, None, "use_dora is true: DoRA"),
    ({}, {f"{PREFIX}{Q}.lora_magnitude_vector": torch.ones(16)}, "DoRA magnitude vector"),
    ({"layer_replication": [[0, 1]]}, None, "layer_replication"),
    ({"init_lora_weights": "pissa"}, None, "modified \\(residual\\) base"),
    ({"bias": "sometimes"}, None, "bias \"sometimes\" is not none, all or lora_only"),
    ({"r": 0}, None, "r is 0, not a positive integer"),
    ({"r": 2}, None, "rank 4 .* r=2"),
    ({"rank_pattern": {"q_proj[": 2}}, None, "not a valid regular expression"),
    ({}, {f"{PREFIX}model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 16)},
     "has .*gate_proj.lora_A.weight' but no .*gate_proj.lora_B.weight'"),
    ({}, {f"{PREFIX}model.layers.9.mlp.gate_proj.lora_A.weight": torch.zeros(4, 16),
          f"{PREFIX}model.layers.9.mlp.gate_proj.lora_B.weight": torch.zeros(24, 4)},
     "target module 'model.layers.9.mlp.gate_proj' has no tensor"),
    ({}, {f"{PREFIX}model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 16),
          f"{PREFIX}model.layers.0.mlp.gate_proj.lora_B.weight": torch.zeros(23, 4)},
     r"gives a \[23, 16\] update but the base's .* is \[24, 16\]"),
    ({}, {f"{PREFIX}model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 16, 1, 1),
          f"{PREFIX}model.layers.0.mlp.gate_proj.lora_B.weight": torch.zeros(24, 4, 1, 1)},
     "not convolution LoRA"),
    ({}, {f"{PREFIX}lm_head.weight": torch.zeros(3, 16)}, r"has shape \[3, 16\], the base's"),
    ({}, {f"{PREFIX}score.weight": torch.zeros(3, 16)}, "the base .* does not have"),
    ({}, {f"{PREFIX}{Q}.lora_E": torch.zeros(4, 1)}, "not a plain LoRA tensor"),
    ({}, {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16)},
     "does not start with 'base_model.model.'"),
])
def test_refusals_are_one_line_naming_the_file_and_key(fam, tmp_path: Path, config, extra,
                                                       expected: str) -> None:
    ad = write_bad(tmp_path, fam, config, extra)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
              "models": [{"model": str(ad)}]}
    with pytest.raises(CheckpointError, match=expected) as info:
        merge(write_recipe(tmp_path / "r.yaml", recipe), dry_run=True)
    assert "\n" not in str(info.value)
    assert str(ad) in str(info.value)


def test_adapter_needs_a_base_and_plus_needs_an_adapter(fam, tmp_path: Path) -> None:
    ad = write_bad(tmp_path, fam)
    with pytest.raises(CheckpointError, match="needs a base_model"):
        with open_inputs(None, [ad]):
            pass
    with pytest.raises(CheckpointError, match="is a PEFT adapter"):
        open_checkpoint(ad)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
              "models": [{"model": f"{fam.base}+{fam.experts[0]}"}]}
    with pytest.raises(RecipeError, match="is not a PEFT adapter directory"):
        merge(write_recipe(tmp_path / "r.yaml", recipe), dry_run=True)


def test_nan_in_an_adapter_names_it(fam, tmp_path: Path) -> None:
    base = load_file(fam.base / "model.safetensors")
    a, b = lora_pair(base, Q, 4, torch.Generator().manual_seed(0))
    a[0, 0] = float("nan")
    ad = write_adapter(tmp_path / "nan", {Q: (a, b)})
    recipe = {"merge_method": "ties", "base_model": str(fam.base), "models": [{"model": str(ad)}]}
    with pytest.raises(Exception, match=f"{ad}.*{Q}.weight|{Q}.weight.*{ad}"):
        merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["q_proj", "layers.1.q_proj", "layers\\.0\\..*", "v_proj",
                                 "proj", "self_attn.q"]), max_size=4, unique=True),
       st.sampled_from([Q, V, "model.layers.10.self_attn.q_proj"]))
def test_pattern_key_is_peft_rule(patterns: list[str], module: str) -> None:
    """The key picked is PEFT's get_pattern_key rule: the first whose regex matches the module
    name at a dot boundary, through its end."""
    got = pattern_key(dict.fromkeys(patterns, 1), module, Path("x"))
    import re
    want = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
    assert got == want
    if got is not None:
        assert module.endswith(got.replace("\\", "")) or ".*" in got


def test_config_defaults_are_peft_defaults(tmp_path: Path) -> None:
    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps({"peft_type": "LORA"}))
    cfg = read_adapter_config(p)
    assert (cfg.r, cfg.alpha, cfg.rslora, cfg.fan_in_fan_out) == (8, 8.0, False, False)
    assert cfg.rank_and_scale("x.q_proj") == (8, 1.0)


def test_engine_task_vector_is_the_delta_itself(tmp_path: Path) -> None:
    """With random (non-dyadic) values, the engine's task vector of a LoRA tensor is exactly
    (B @ A) * scale, not the rounded (W0 + delta) - W0; the stats pass sees the same."""
    from mergewise.engine import MergeJob
    from mergewise.recipe import parse_recipe

    fam = make_family(tmp_path / "fam", dtype=torch.float32)
    base = load_file(fam.base / "model.safetensors")
    gen = torch.Generator().manual_seed(4)
    out_dim, in_dim = base[f"{Q}.weight"].shape
    a, b = torch.randn(4, in_dim, generator=gen) * 1e-3, torch.randn(out_dim, 4, generator=gen)
    ad = write_adapter(tmp_path / "ad", {Q: (a, b)})
    rec = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(fam.base),
                        "models": [{"model": str(ad)}]})
    with open_inputs(fam.base, [ad]) as (bc, models):
        job = MergeJob(rec, bc, models)
        plan = next(p for p in job.tensors if p.name == f"{Q}.weight")
        w0 = job.load(bc, plan.name)
        (tau,) = job.task_vectors(plan, w0)
        assert torch.equal(tau, (b @ a) * 2.0)
        assert not torch.equal((w0 + (b @ a) * 2.0) - w0, (b @ a) * 2.0)  # the round trip loses
