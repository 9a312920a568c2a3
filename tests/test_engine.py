"""Engine: the streaming file merge equals the in-memory API bit for bit; sharded and unsharded
inputs agree; tensor rules (integer buffers, mismatches, NaN/Inf, architectures, quantized
inputs); output dtype, copied files, model card, report; inputs never modified; dry run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ckpt_helpers import (
    Family,
    copy_family,
    edit_weights,
    leftovers,
    load_dir,
    recipe_for,
    tree_hashes,
)
from safetensors.torch import load_file

import mergewise
from mergewise import (
    CheckpointError,
    MergewiseError,
    NonFiniteError,
    ShapeMismatchError,
    load_recipe,
    merge,
    merge_state_dicts,
)

# method -> (method-wide parameters, per-model parameters, uses a base)
CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]] | None, bool]] = {
    "ties": ({"density": 0.3, "lambda": 0.9}, [{"weight": 1.0}, {"weight": 0.7}], True),
    "ties_global": ({"density": 0.3, "scope": "global"}, None, True),
    "dare_ties": ({"density": 0.5}, [{"weight": 0.8}, {"weight": 1.2}], True),
    "dare_linear": ({"density": 0.6, "lambda": 0.5}, None, True),
    "task_arithmetic": ({"lambda": 0.6}, [{"weight": 0.5}, {"weight": 1.5}], True),
    "linear": ({}, [{"weight": 0.3}, {"weight": 0.7}], False),
    "slerp": ({"t": 0.3}, None, False),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, None, True),
    "breadcrumbs_ties": ({"density": 0.8, "gamma": 0.05}, None, True),
}


def method_of(case: str) -> str:
    return "ties" if case == "ties_global" else case


def file_recipe(fam: Family, case: str, seed: int = 7) -> dict[str, Any]:
    params, model_params, with_base = CASES[case]
    models = [{"model": str(e), **({"parameters": model_params[i]} if model_params else {})}
              for i, e in enumerate(fam.experts)]
    data: dict[str, Any] = {"merge_method": method_of(case), "models": models,
                            "parameters": params, "seed": seed}
    if with_base:
        data["base_model"] = str(fam.base)
    return data


def memory_merge(fam: Family, case: str, seed: int = 7, **kw: Any) -> dict[str, torch.Tensor]:
    params, model_params, with_base = CASES[case]
    base = load_file(fam.base / "model.safetensors") if with_base else None
    experts = [load_file(e / "model.safetensors") for e in fam.experts]
    return merge_state_dicts(base, experts, method_of(case), parameters=params,
                             model_parameters=model_params, seed=seed, **kw)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# --- streaming == in memory ---------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fam_name", ["family_f32", "family_bf16"])
def test_file_merge_equals_in_memory_merge(case: str, fam_name: str, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    fam: Family = request.getfixturevalue(fam_name)
    result = merge(file_recipe(fam, case), tmp_path / "out")
    from_files = load_dir(tmp_path / "out")
    in_memory = memory_merge(fam, case)
    assert_same_tensors(from_files, in_memory)
    base = load_file(fam.base / "model.safetensors")
    for k, v in from_files.items():
        assert v.dtype == fam.dtype  # written in the base's dtype
        assert v.shape == base[k].shape
    # the merge did something (no method silently returned the base)
    assert any(not torch.equal(from_files[k], base[k]) for k in base)
    assert result.files == ["model.safetensors"]


@pytest.mark.parametrize("case", ["ties", "ties_global", "dare_ties", "linear", "slerp"])
def test_sharded_and_unsharded_inputs_give_identical_output(
        case: str, family_f32: Family, family_sharded_f32: Family, tmp_path: Path) -> None:
    merge(file_recipe(family_f32, case), tmp_path / "a")
    merge(file_recipe(family_sharded_f32, case), tmp_path / "b")
    assert_same_tensors(load_dir(tmp_path / "a"), load_dir(tmp_path / "b"))


def test_sharded_output_equals_single_file_output(family_f32: Family, tmp_path: Path) -> None:
    single = merge(file_recipe(family_f32, "dare_ties"), tmp_path / "single")
    sharded = merge(file_recipe(family_f32, "dare_ties"), tmp_path / "sharded", shard_size="2KB")
    assert single.files == ["model.safetensors"]
    assert len(sharded.files) > 3
    assert sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors")) == \
        sorted(sharded.files)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    out = load_dir(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                  for v in out.values())
    assert_same_tensors(load_dir(tmp_path / "single"), out)
    # and the sharded output is itself a valid mergewise input
    with mergewise.checkpoint.open_checkpoint(tmp_path / "sharded") as ckpt:
        for name in ckpt.names():
            assert torch.equal(ckpt.read(name), out[name])


def test_mixed_input_dtypes(family_f32: Family, family_bf16: Family, tmp_path: Path) -> None:
    """A float32 base with bfloat16 experts: upcast before arithmetic, written as the base."""
    data = recipe_for(family_bf16, "ties")
    data["base_model"] = str(family_f32.base)
    merge(data, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    expected = merge_state_dicts(load_file(family_f32.base / "model.safetensors"),
                                 [load_file(e / "model.safetensors") for e in family_bf16.experts])
    assert_same_tensors(out, expected)
    assert all(v.dtype == torch.float32 for v in out.values())


def test_exact_values_through_files(family_bf16: Family, tmp_path: Path) -> None:
    """Cases whose answer is known without the method's code: lambda 0 gives the base, a linear
    merge with weights (1, 0) gives the first model, bit for bit in bf16."""
    base = load_file(family_bf16.base / "model.safetensors")
    first = load_file(family_bf16.experts[0] / "model.safetensors")
    merge(recipe_for(family_bf16, "task_arithmetic", parameters={"lambda": 0.0}), tmp_path / "a")
    assert_same_tensors(load_dir(tmp_path / "a"), base)
    data = recipe_for(family_bf16, "linear")
    data["models"][0]["parameters"] = {"weight": 1.0}
    data["models"][1]["parameters"] = {"weight": 0.0}
    merge(data, tmp_path / "b")
    assert_same_tensors(load_dir(tmp_path / "b"), first)


def test_filter_lists_apply_per_tensor(family_f32: Family, tmp_path: Path) -> None:
    data = recipe_for(family_f32, "task_arithmetic", parameters={
        "lambda": [{"glob": "*mlp*", "value": 0.0}, {"glob": "*embed_tokens*", "value": 0.0},
                   {"value": 1.0}]})
    merge(data, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    base = load_file(family_f32.base / "model.safetensors")
    for name in out:
        if "mlp" in name or "embed_tokens" in name:
            assert torch.equal(out[name], base[name]), name
        else:
            assert not torch.equal(out[name], base[name]), name


def test_dare_is_independent_of_tensor_order(family_f32: Family) -> None:
    base = load_file(family_f32.base / "model.safetensors")
    experts = [load_file(e / "model.safetensors") for e in family_f32.experts]
    forward = merge_state_dicts(base, experts, "dare_ties", parameters={"density": 0.3}, seed=5)
    backward = merge_state_dicts(dict(reversed(base.items())),
                                 [dict(reversed(e.items())) for e in experts], "dare_ties",
                                 parameters={"density": 0.3}, seed=5)
    assert list(backward) == list(reversed(list(forward)))
    assert_same_tensors(forward, backward)
    other_seed = merge_state_dicts(base, experts, "dare_ties", parameters={"density": 0.3}, seed=6)
    assert any(not torch.equal(forward[k], other_seed[k]) for k in forward)


# --- tensor rules ------------------------------------------------------------------------------

def add_buffers(fam: Family) -> None:
    def base_edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.position_ids"] = torch.arange(64).reshape(1, 64)
        sd["model.causal_mask"] = torch.ones(4, 4).tril().bool()

    def expert1_edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.position_ids"] = torch.arange(64).reshape(1, 64) * 3  # differs: ignored
        sd["model.only_here_steps"] = torch.tensor([7])  # extra integer tensor: ignored

    edit_weights(fam.base, base_edit)
    edit_weights(fam.experts[1], expert1_edit)  # expert 0 has no buffers at all


@pytest.mark.parametrize("out_dtype", [None, "float16"])
def test_integer_buffers_copied_from_base(family_f32: Family, tmp_path: Path,
                                          out_dtype: str | None) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    add_buffers(fam)
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    result = merge(recipe_for(fam, "ties", **extra), tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["model.position_ids"], torch.arange(64).reshape(1, 64))
    assert out["model.position_ids"].dtype == torch.int64  # out_dtype is for floats only
    assert torch.equal(out["model.causal_mask"], torch.ones(4, 4).tril().bool())
    assert "model.only_here_steps" not in out
    float_dtype = torch.float16 if out_dtype else torch.float32
    assert {v.dtype for k, v in out.items() if v.is_floating_point()} == {float_dtype}
    records = {r["name"]: r for r in result.records}
    assert records["model.position_ids"]["merged"] is False
    assert records["model.norm.weight"]["merged"] is True
    assert result.summary.copied == 2
    # and the in-memory API follows the same rule
    mem = merge_state_dicts(load_file(fam.base / "model.safetensors"),
                            [load_file(e / "model.safetensors") for e in fam.experts], "ties",
                            out_dtype=out_dtype)
    assert_same_tensors(out, mem)


def test_mismatches_reported_all_at_once(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")

    def expert0(sd: dict[str, torch.Tensor]) -> None:
        del sd["model.norm.weight"]
        sd["model.extra_adapter.weight"] = torch.zeros(2, 2)

    def expert1(sd: dict[str, torch.Tensor]) -> None:
        sd["lm_head.weight"] = torch.zeros(33, 16)  # one extra vocabulary row
        sd["model.layers.0.input_layernorm.weight"] = torch.ones(16, dtype=torch.int64)

    edit_weights(fam.experts[0], expert0)
    edit_weights(fam.experts[1], expert1)
    with pytest.raises(ShapeMismatchError) as exc:
        merge(recipe_for(fam, "ties"), tmp_path / "out")
    msg = one_line(exc)
    assert msg.startswith("4 mismatch(es)")
    assert f"{fam.experts[0]}: missing tensor 'model.norm.weight'" in msg
    assert f"{fam.experts[0]}: extra tensor 'model.extra_adapter.weight'" in msg
    assert f"{fam.experts[1]}: tensor 'lm_head.weight' has shape [33, 16]" in msg
    assert "[32, 16]" in msg
    assert f"{fam.experts[1]}: tensor 'model.layers.0.input_layernorm.weight' is torch.int64" in msg
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_many_mismatches_are_summarised(family_f32: Family) -> None:
    base = load_file(family_f32.base / "model.safetensors")
    expert = {k: v for i, (k, v) in enumerate(base.items()) if i >= 12}  # 12 tensors missing
    with pytest.raises(ShapeMismatchError) as exc:
        merge_state_dicts(base, [expert], "task_arithmetic")
    msg = one_line(exc)
    assert msg.startswith("12 mismatch(es)") and "and 4 more" in msg


def set_value(fam_dir: Path, name: str, value: float) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd[name].view(-1)[-1] = value

    edit_weights(fam_dir, edit)


@pytest.mark.parametrize("case", ["ties", "ties_global", "linear"])
@pytest.mark.parametrize("who, tensor, value", [
    ("base", "model.embed_tokens.weight", float("nan")),
    ("expert_0", "model.layers.1.mlp.down_proj.weight", float("inf")),
    ("expert_1", "lm_head.weight", float("-inf")),
])
def test_non_finite_input_is_named_and_nothing_written(
        family_f32: Family, tmp_path: Path, case: str, who: str, tensor: str,
        value: float) -> None:
    if case == "linear" and who == "base":
        pytest.skip("linear does not read the base's float tensors")
    fam = copy_family(family_f32, tmp_path / "fam")
    target = fam.root / who
    set_value(target, tensor, value)
    with pytest.raises(NonFiniteError) as exc:
        merge(file_recipe(fam, case), tmp_path / "out")
    msg = one_line(exc)
    assert str(target) in msg and f"'{tensor}'" in msg and "NaN/Inf" in msg
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_non_finite_in_memory_names_the_model(family_f32: Family) -> None:
    base = load_file(family_f32.base / "model.safetensors")
    experts = {name: load_file(e / "model.safetensors")
               for name, e in zip(["math", "code"], family_f32.experts, strict=True)}
    experts["code"]["model.norm.weight"][3] = float("nan")
    with pytest.raises(NonFiniteError) as exc:
        merge_state_dicts(base, experts, "task_arithmetic")
    msg = one_line(exc)
    assert msg.startswith("code:") and "'model.norm.weight'" in msg


@pytest.mark.parametrize("out_dtype, lam", [(None, 1e300), ("float16", 1e9)])
def test_method_overflow_is_caught(family_f32: Family, tmp_path: Path, out_dtype: str | None,
                                   lam: float) -> None:
    """A result that is (or becomes, once cast to out_dtype) Inf is never written."""
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    with pytest.raises(NonFiniteError) as exc:
        merge(recipe_for(family_f32, "task_arithmetic", parameters={"lambda": lam}, **extra),
              tmp_path / "out")
    msg = one_line(exc)
    assert "task_arithmetic" in msg and "'model.embed_tokens.weight'" in msg
    if out_dtype:
        assert "out_dtype float16" in msg
    assert not (tmp_path / "out").exists()


def set_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_mixed_architectures(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    set_config(fam.experts[1], architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ShapeMismatchError) as exc:
        merge(recipe_for(fam, "ties"), tmp_path / "out")
    msg = one_line(exc)
    assert "mixed architectures" in msg
    assert str(fam.base) in msg and "LlamaForCausalLM" in msg
    assert str(fam.experts[1]) in msg and "MistralForCausalLM" in msg
    assert not (tmp_path / "out").exists()


def test_quantized_checkpoint_refused(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    set_config(fam.experts[0], quantization_config={"quant_method": "bitsandbytes",
                                                    "load_in_4bit": True})
    with pytest.raises(CheckpointError) as exc:
        merge(recipe_for(fam, "ties"), tmp_path / "out")
    msg = one_line(exc)
    assert str(fam.experts[0]) in msg and "bitsandbytes" in msg and "dequantize" in msg
    assert not (tmp_path / "out").exists()


def test_cuda_requested_without_cuda(family_f32: Family, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(MergewiseError) as exc:
        merge(recipe_for(family_f32, "ties"), tmp_path / "out", device="cuda")
    assert "--device cpu" in one_line(exc)
    assert not (tmp_path / "out").exists()


# --- output contents --------------------------------------------------------------------------

@pytest.mark.parametrize("fam_name, out_dtype, expected", [
    ("family_bf16", None, torch.bfloat16),
    ("family_f32", None, torch.float32),
    ("family_f32", "bfloat16", torch.bfloat16),
    ("family_bf16", "float16", torch.float16),
    ("family_bf16", "float32", torch.float32),
])
def test_output_dtype_and_config(fam_name: str, out_dtype: str | None, expected: torch.dtype,
                                 tmp_path: Path, request: pytest.FixtureRequest) -> None:
    fam: Family = request.getfixturevalue(fam_name)
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    merge(recipe_for(fam, "ties", **extra), tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert {v.dtype for v in out.values()} == {expected}
    base_cfg = json.loads((fam.base / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["torch_dtype"] == str(expected).removeprefix("torch.")
    assert {k: v for k, v in out_cfg.items() if k != "torch_dtype"} == \
        {k: v for k, v in base_cfg.items() if k != "torch_dtype"}


def test_compute_dtype_float64(family_bf16: Family, tmp_path: Path) -> None:
    merge(recipe_for(family_bf16, "ties", dtype="float64", out_dtype="bfloat16"), tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    mem = merge_state_dicts(load_file(family_bf16.base / "model.safetensors"),
                            [load_file(e / "model.safetensors") for e in family_bf16.experts],
                            "ties", dtype="float64", out_dtype="bfloat16")
    assert_same_tensors(out, mem)
    # without out_dtype, an explicit dtype is also the written one (mergekit)
    merge(recipe_for(family_bf16, "ties", dtype="float64"), tmp_path / "out64")
    assert {v.dtype for v in load_dir(tmp_path / "out64").values()} == {torch.float64}
    # and with no dtype at all: computed in float32, written in the base's bfloat16
    merge(recipe_for(family_bf16, "ties"), tmp_path / "plain")
    assert {v.dtype for v in load_dir(tmp_path / "plain").values()} == {torch.bfloat16}


def test_sidecar_files(family_bf16: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = recipe_for(family_bf16, "ties", parameters={"density": 0.4}, name="my merge")
    result = merge(data, out)
    files = {p.name for p in out.iterdir()}
    assert files >= {"model.safetensors", "config.json", "generation_config.json",
                     "tokenizer_config.json", "special_tokens_map.json", "README.md",
                     "mergewise_recipe.yaml", "report.json"}
    assert [f for f in files if f.endswith((".safetensors", ".json.tmp", ".bin"))] == \
        ["model.safetensors"]
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (family_bf16.base / name).read_bytes(), name
    # model card: front matter, version, the recipe itself
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    assert f"base_model: {family_bf16.base}" in card
    assert "# my merge" in card and "**ties**" in card and mergewise.__version__ in card
    rec = mergewise.parse_recipe(data)
    assert rec.to_yaml().rstrip() in card
    assert "density: 0.4" in card
    # the recipe file reloads to the same recipe
    saved, _ = load_recipe(out / "mergewise_recipe.yaml")
    assert saved == rec
    # report: one record per tensor, in output order
    report = json.loads((out / "report.json").read_text())
    assert report["merge_method"] == "ties"
    assert report["mergewise_version"] == mergewise.__version__
    assert report["tasks"] == ["expert_0", "expert_1"]
    names = [n for n, _ in family_bf16.shape.tensors()]
    assert sorted(r["name"] for r in report["tensors"]) == sorted(names)
    assert len(report["tensors"]) == len(names)
    assert [r["name"] for r in report["tensors"]] == [r["name"] for r in result.records]
    for r in report["tensors"]:
        assert r["merged"] is True
        assert r["numel"] == torch.Size(r["shape"]).numel()
    assert report["plan"]["tensors"] == len(names)
    assert report["plan"]["parameters"] == family_bf16.shape.parameters
    assert result.report_path == out / "report.json"
    # the safetensors metadata carries the version and recipe
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as fh:
        meta = fh.metadata()
    assert meta["mergewise_version"] == mergewise.__version__
    assert yaml.safe_load(meta["mergewise_recipe"]) == yaml.safe_load(rec.to_yaml())


def test_tokenizer_source(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    (fam.experts[1] / "tokenizer_config.json").write_text('{"chat": "expert tokenizer"}')
    (fam.experts[1] / "generation_config.json").write_text('{"expert": true}')
    merge(recipe_for(fam, "ties", tokenizer_source=str(fam.experts[1])), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_text() == '{"chat": "expert tokenizer"}'
    # only tokenizer files come from tokenizer_source; the rest from the base
    assert (out / "generation_config.json").read_bytes() == \
        (fam.base / "generation_config.json").read_bytes()


def test_inputs_are_never_modified(family_bf16: Family, family_sharded_f32: Family,
                                   tmp_path: Path) -> None:
    before = {f.root: tree_hashes(f.root) for f in (family_bf16, family_sharded_f32)}
    merge(file_recipe(family_bf16, "ties_global"), tmp_path / "a")
    merge(file_recipe(family_sharded_f32, "dare_ties"), tmp_path / "b", shard_size="3KB")
    merge(file_recipe(family_sharded_f32, "slerp"), tmp_path / "c")
    for f in (family_bf16, family_sharded_f32):
        assert tree_hashes(f.root) == before[f.root]


@pytest.mark.parametrize("case", ["ties_global", "task_arithmetic", "dare_ties", "linear",
                                  "slerp"])
def test_in_memory_inputs_are_never_modified(family_f32: Family, case: str) -> None:
    params, model_params, with_base = CASES[case]
    base = load_file(family_f32.base / "model.safetensors")
    experts = [load_file(e / "model.safetensors") for e in family_f32.experts]
    saved = [{k: v.clone() for k, v in sd.items()} for sd in [base, *experts]]
    out = merge_state_dicts(base if with_base else None, experts, method_of(case),
                            parameters=params, model_parameters=model_params)
    for sd, copy in zip([base, *experts], saved, strict=True):
        assert_same_tensors(sd, copy)
    # and the result does not alias an input
    for k, v in out.items():
        assert all(v.data_ptr() != sd[k].data_ptr() for sd in [base, *experts])


def test_dry_run_writes_nothing(family_f32: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    result = merge(recipe_for(family_f32, "ties", parameters={"scope": "global", "density": 0.2}),
                   out, dry_run=True)
    assert not out.exists()
    assert sorted(tmp_path.iterdir()) == before
    assert result.files == [] and result.records == []
    s = result.summary
    n = family_f32.shape.parameters
    assert (s.tensors, s.merged, s.copied) == (21, 21, 0)
    assert s.parameters == n
    assert s.bytes_read == n * 4 * 3  # base + 2 experts, float32
    assert s.bytes_written == n * 4
    assert s.largest_tensor == "model.embed_tokens.weight [32, 16]"
    assert s.peak_bytes_estimate == 32 * 16 * 4 * (2 + 4)
    assert s.stats_passes == 2  # global top-k: histogram pass + candidates pass
    assert any("tensors: 21" in line for line in s.lines())


def test_dry_run_still_validates_everything(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    edit_weights(fam.experts[0], lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ShapeMismatchError) as exc:
        merge(recipe_for(fam, "ties"), tmp_path / "out", dry_run=True)
    assert "'lm_head.weight'" in one_line(exc)


def test_progress_bar_runs(family_f32: Family, tmp_path: Path) -> None:
    result = merge(recipe_for(family_f32, "ties", parameters={"scope": "global"}),
                   tmp_path / "out", progress=True)
    assert result.summary.tensors == 21 and (tmp_path / "out" / "model.safetensors").is_file()


def test_all_zero_task_vectors_return_the_base_bit_for_bit():
    import mergewise as mw

    base = {"w": torch.randn(4, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    experts = [{"w": base["w"].clone(), "b": base["b"] + 1.0} for _ in range(2)]
    for method in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs"):
        out = mw.merge_state_dicts(base, experts, method)  # float32 compute
        assert out["w"].dtype == torch.float64
        assert torch.equal(out["w"], base["w"]), method


def test_unchanged_tensor_is_a_copy_not_the_input() -> None:
    """A tensor no expert moved is written as the base, but never as the caller's own tensor."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
    experts = [{"w": base["w"].clone(), "b": base["b"] + 1.0} for _ in range(2)]
    out = merge_state_dicts(base, experts, "task_arithmetic")
    assert torch.equal(out["w"], base["w"])
    assert out["w"].data_ptr() != base["w"].data_ptr()
    saved = base["w"].clone()
    out["w"].add_(1.0)  # editing the merged model must not edit the caller's base
    assert torch.equal(base["w"], saved)


def test_unchanged_tensor_still_checked_against_out_dtype() -> None:
    base = {"w": torch.full((3,), 1e5), "b": torch.zeros(2)}
    experts = [{"w": base["w"].clone(), "b": torch.ones(2)}]
    with pytest.raises(NonFiniteError) as exc:
        merge_state_dicts(base, experts, "task_arithmetic", out_dtype="float16")
    msg = one_line(exc)
    assert "'w'" in msg and "float16" in msg


def test_dry_run_reports_an_existing_output(family_f32: Family, tmp_path: Path) -> None:
    from mergewise.errors import OutputError

    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        merge(recipe_for(family_f32, "ties"), tmp_path / "out", dry_run=True)
    merge(recipe_for(family_f32, "ties"), tmp_path / "out", dry_run=True, overwrite=True)
