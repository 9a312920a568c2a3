"""Feature capture on a tiny random BERT built here; LOT / RegMean merges from its statistics.

The end-to-end tests that need transformers (the optional bench extra; .ci/run installs it): the
BERT zoo, Hugging Face directories, text calibration through a tokenizer, recipes and the CLI.
Capture on plain torch modules, the stats file, calibration data and the reuse rules are tested
without it (test_capture.py, test_statsfile.py, test_calibration.py, test_sources.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mergewise import FeatureError, RecipeError, merge, merge_state_dicts
from mergewise.checkpoint import open_checkpoint
from mergewise.features import capture, load_stats

# transformers is optional (the bench extra; .ci/run installs it): without it these are skipped
transformers = pytest.importorskip("transformers", reason="the tiny-BERT feature tests need transformers")
BertConfig, BertModel = transformers.BertConfig, transformers.BertModel

TASKS = ("alpha", "beta", "gamma")
VOCAB = 64
SEQ = 10


def tiny_bert(seed: int) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, type_vocab_size=1)
    return BertModel(cfg).eval()


def experts_of(base: BertModel, scale: float = 0.05) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for task in TASKS:
        out[task] = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point()
                     else v.clone() for k, v in base.state_dict().items()}
    return out


def task_batches(k: int, n: int, seed: int, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Task k draws tokens from its own vocabulary slice; lengths vary, so batches are padded."""
    g = torch.Generator().manual_seed(1000 * k + seed)
    lo = 4 + k * 18
    batches = []
    for _ in range(n):
        ids = torch.randint(lo, lo + 18, (4, SEQ), generator=g)
        mask = torch.ones(4, SEQ, dtype=torch.long)
        if pad:
            for r, length in enumerate(torch.randint(3, SEQ + 1, (4,), generator=g).tolist()):
                mask[r, length:] = 0
                ids[r, length:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture(scope="module")
def zoo() -> tuple[BertModel, dict[str, dict[str, torch.Tensor]], dict[str, object]]:
    base = tiny_bert(0)
    experts = experts_of(base)
    stats = {}
    for k, task in enumerate(TASKS):
        model = tiny_bert(0)
        model.load_state_dict(experts[task])
        stats[task] = capture(model, task_batches(k, 16, 0), label=task)
    return base, experts, stats


def test_capture_experts_with_one_module(zoo) -> None:
    from mergewise.features import capture_experts

    base, experts, stats = zoo
    module = tiny_bert(0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    got = capture_experts(module, experts, {t: task_batches(k, 16, 0) for k, t in enumerate(TASKS)})
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    for t in TASKS:  # the very same statistics as one module per expert
        assert got[t].keys() == stats[t].keys()
        assert all(torch.equal(got[t].tensor(k), stats[t].tensor(k)) for k in got[t].keys())
        assert got[t].metadata["probe"] == stats[t].metadata["probe"]


def test_hooks_fire_on_every_linear_and_layernorm(zoo) -> None:
    base, _, stats = zoo
    want = {n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    assert set(stats["alpha"].layers) == want
    assert {i.kind for n, i in stats["alpha"].layers.items() if "LayerNorm" in n} == {"norm"}


def test_padded_tokens_are_excluded() -> None:
    model = tiny_bert(0)
    padded = task_batches(0, 2, 5)
    real = int(sum(b["attention_mask"].sum() for b in padded))
    stats = capture(model, padded)
    q = "encoder.layer.0.attention.self.query"
    assert stats.rows(q) == real
    assert stats.rows("pooler.dense") == 8  # (batch, hidden) input: one row per example
    # the same examples one at a time, cut to their real length: identical statistics
    single = []
    for b in padded:
        for r in range(4):
            n = int(b["attention_mask"][r].sum())
            single.append({k: v[r:r + 1, :n] for k, v in b.items()})
    alone = capture(model, single)
    for name in (q, "encoder.layer.1.output.dense"):
        torch.testing.assert_close(stats.gram(name), alone.gram(name), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.energy("embeddings.LayerNorm"),
                               alone.energy("embeddings.LayerNorm"), rtol=1e-5, atol=1e-4)


def layer_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The real-token inputs of every Linear and LayerNorm (for the drift measurement)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    mask_box: list[torch.Tensor] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm)) and not name.startswith("pooler"):
            def hook(_: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0]
                seen.setdefault(name, []).append(x[mask_box[0]] if x.dim() == 3 else x)
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            mask_box[:] = [b["attention_mask"].bool()]
            model(**b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def unit_output(module: nn.Module, sd: dict[str, torch.Tensor], name: str, x: torch.Tensor
                ) -> torch.Tensor:
    w, b = sd[f"{name}.weight"], sd[f"{name}.bias"]
    if isinstance(module, nn.LayerNorm):
        return nn.functional.layer_norm(x, module.normalized_shape, w, b, module.eps)
    return x @ w.T + b


def test_lot_drifts_less_than_task_arithmetic_at_every_layer(zoo) -> None:
    base, experts, stats = zoo
    base_sd = base.state_dict()
    lot = merge_state_dicts(base_sd, experts, "lot", features=stats)
    ta = merge_state_dicts(base_sd, experts, "task_arithmetic",
                           parameters={"normalize": True})  # the mean task vector
    drift = {"lot": {}, "ta": {}}
    modules = dict(base.named_modules())
    for k, task in enumerate(TASKS):
        model = tiny_bert(0)
        model.load_state_dict(experts[task])
        held_out = layer_inputs(model, task_batches(k, 8, 99))  # not the calibration draw
        for name, x in held_out.items():
            want = unit_output(modules[name], experts[task], name, x)
            for label, sd in (("lot", lot), ("ta", ta)):
                err = float(((unit_output(modules[name], sd, name, x) - want) ** 2).mean())
                drift[label][name] = drift[label].get(name, 0.0) + err
    assert len(drift["lot"]) == 2 * 6 + 2 * 2 + 1  # 6 Linear + 2 LayerNorm per layer, embeddings
    worse = [n for n in drift["lot"] if drift["lot"][n] >= drift["ta"][n]]
    assert not worse, {n: (drift["lot"][n], drift["ta"][n]) for n in worse}


def test_saved_stats_give_the_identical_merge(zoo, tmp_path: Path) -> None:
    base, experts, stats = zoo
    paths = {t: stats[t].save(tmp_path / f"{t}.safetensors") for t in TASKS}
    meta = load_stats(paths["alpha"]).metadata
    assert meta["mergewise_features"] == "2" and int(meta["rows"]) > 0
    for method in ("lot", "regmean"):
        mem = merge_state_dicts(base.state_dict(), experts, method, features=stats)
        disk = merge_state_dicts(base.state_dict(), experts, method,
                                 features={t: load_stats(p) for t, p in paths.items()})
        assert mem.keys() == disk.keys()
        assert all(torch.equal(mem[k], disk[k]) for k in mem), method
    with open_checkpoint(paths["beta"]) as ckpt:  # float64 accumulators
        assert ckpt.info("gram:encoder.layer.0.attention.self.query").dtype == torch.float64


def test_stats_of_another_model_are_refused(zoo) -> None:
    base, experts, stats = zoo
    swapped = {"alpha": stats["beta"], "beta": stats["alpha"], "gamma": stats["gamma"]}
    with pytest.raises(FeatureError, match="another model"):
        merge_state_dicts(base.state_dict(), experts, "lot", features=swapped)
    with pytest.raises(FeatureError, match="needs the calibration statistics"):
        merge_state_dicts(base.state_dict(), experts, "lot")


def test_statistics_that_do_not_fit_a_tensor_fail_before_merging(zoo) -> None:
    from mergewise.features import FeatureStats

    base, experts, stats = zoo
    q = "encoder.layer.1.attention.self.query"
    bad = FeatureStats(stats["gamma"].layers, {**{k: stats["gamma"].tensor(k)
                                                  for k in stats["gamma"].keys()},
                                               f"gram:{q}": torch.eye(5, dtype=torch.float64)},
                       shared=stats["gamma"].shared)  # key and value read query's Gram
    with pytest.raises(FeatureError, match=f"'{q}' has a 5-wide Gram but tensor '{q}.weight'"):
        merge_state_dicts(base.state_dict(), experts, "lot",
                          features=[stats["alpha"], stats["beta"], bad])


def test_lot_with_tadrop_sparsify(zoo) -> None:
    base, experts, stats = zoo
    dense = merge_state_dicts(base.state_dict(), experts, "lot", features=stats)
    sparse = merge_state_dicts(base.state_dict(), experts, "lot", features=stats,
                               sparsify={"method": "tadrop", "drop_rate": 0.5})
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(dense[name], sparse[name])
    assert torch.isfinite(sparse[name]).all()


# --- the file path: HF directories, text calibration, recipe, CLI ---------------------------

def write_tokenizer(directory: Path) -> None:
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 5)]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def hf_zoo(tmp_path_factory: pytest.TempPathFactory, zoo) -> Path:
    root = tmp_path_factory.mktemp("hf_zoo")
    base, experts, _ = zoo
    base.save_pretrained(str(root / "base"))
    write_tokenizer(root / "base")
    g = torch.Generator().manual_seed(3)
    for k, task in enumerate(TASKS):
        model = tiny_bert(0)
        model.load_state_dict(experts[task])
        model.save_pretrained(str(root / task))
        lo = k * 18
        lines = [json.dumps({"text": " ".join(f"w{lo + int(i)}" for i in
                                               torch.randint(0, 18, (int(n),), generator=g))})
                 for n in torch.randint(2, 9, (40,), generator=g)]
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def recipe(root: Path, method: str = "lot", features: bool = False, **extra: object) -> Path:
    models = []
    for task in TASKS:
        entry: dict = {"model": task, "calibration": {"data": f"{task}.jsonl", "num_examples": 16,
                                                      "max_length": 12, "batch_size": 8}}
        if features:
            entry["features"] = f"stats/{task}.safetensors"
        models.append(entry)
    data = {"merge_method": method, "base_model": "base", "models": models, **extra}
    path = root / f"recipe-{method}-{features}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_merge_and_cli_features_agree(hf_zoo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergewise.cli import app

    direct = merge(recipe(hf_zoo), tmp_path / "direct")
    runner = CliRunner()
    result = runner.invoke(app, ["features", str(recipe(hf_zoo, features=True))])
    assert result.exit_code == 0, result.output
    assert "alpha: 16 examples" in result.output
    stats_file = hf_zoo / "stats" / "alpha.safetensors"
    meta = load_stats(stats_file).metadata
    assert json.loads(meta["calibration"])["num_examples"] == 16
    reused = merge(recipe(hf_zoo, features=True), tmp_path / "reused")
    a = open_checkpoint(direct.out)
    b = open_checkpoint(reused.out)
    assert a.names() == b.names()
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.names())
    report = json.loads((direct.out / "report.json").read_text())
    assert [f["task"] for f in report["features"]] == list(TASKS)
    assert report["features"][0]["calibration"]["num_examples"] == 16
    rows = [r for r in direct.records if r["merged"]]
    assert {r.get("unit") for r in rows} >= {"matmul", "scale", "shift", "fallback"}
    # a stats file computed with other settings is stale, and said so
    stale = yaml.safe_load(recipe(hf_zoo, features=True).read_text())
    stale["models"][0]["calibration"]["num_examples"] = 8
    (hf_zoo / "stale.yaml").write_text(yaml.safe_dump(stale))
    with pytest.raises(FeatureError, match="num_examples"):
        merge(hf_zoo / "stale.yaml", tmp_path / "stale")
    # the data is identified by content: other texts make the stats file stale, too
    changed = yaml.safe_load(recipe(hf_zoo, features=True).read_text())
    (hf_zoo / "other.jsonl").write_text('{"text": "w1 w2"}\n')
    changed["models"][0]["calibration"]["data"] = "other.jsonl"
    (hf_zoo / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(FeatureError, match="data_sha256 differ"):
        merge(hf_zoo / "changed.yaml", tmp_path / "changed")
    # ... while the same texts at another path (a moved project) reuse it
    (hf_zoo / "moved.jsonl").write_bytes((hf_zoo / "alpha.jsonl").read_bytes())
    changed["models"][0]["calibration"]["data"] = "moved.jsonl"
    (hf_zoo / "moved.yaml").write_text(yaml.safe_dump(changed))
    mtime = stats_file.stat().st_mtime_ns
    moved = merge(hf_zoo / "moved.yaml", tmp_path / "moved")
    assert stats_file.stat().st_mtime_ns == mtime
    c = open_checkpoint(moved.out)
    assert all(torch.equal(a.read(n), c.read(n)) for n in a.names())


def test_missing_features_fail_before_any_model_is_loaded(hf_zoo: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mergewise.api as api

    def no_loading(*a: object, **k: object) -> None:
        raise AssertionError("a checkpoint was opened")

    monkeypatch.setattr(api, "open_inputs", no_loading)
    data = yaml.safe_load(recipe(hf_zoo).read_text())
    del data["models"][1]["calibration"]
    with pytest.raises(RecipeError, match=r"models\.1 \(beta\) has neither"):
        merge(data, tmp_path / "x")
    data = yaml.safe_load(recipe(hf_zoo).read_text())
    data["models"][2]["calibration"]["data"] = "nowhere.jsonl"
    (hf_zoo / "missing.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(FeatureError, match=r"models\.2\.calibration\.data: .*nowhere\.jsonl"):
        merge(hf_zoo / "missing.yaml", tmp_path / "y")
    with pytest.raises(RecipeError, match="unknown key 'num_exmples'.*did you mean 'num_examples'"):
        from mergewise import parse_recipe

        data["models"][0]["calibration"]["num_exmples"] = 3
        parse_recipe(data)


def test_regmean_recipe_without_base(hf_zoo: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(recipe(hf_zoo, method="regmean").read_text())
    del data["base_model"]
    data["tokenizer_source"] = str(hf_zoo / "base")
    (hf_zoo / "regmean.yaml").write_text(yaml.safe_dump(data))
    result = merge(hf_zoo / "regmean.yaml", tmp_path / "regmean")
    out = open_checkpoint(result.out)
    experts = [open_checkpoint(hf_zoo / t) for t in TASKS]
    ln = "encoder.layer.0.output.LayerNorm.weight"  # not a matmul: the plain mean
    torch.testing.assert_close(out.read(ln), sum(e.read(ln) for e in experts) / 3)
    q = "encoder.layer.0.attention.self.query.weight"  # a least-squares solve, not the mean
    assert not torch.allclose(out.read(q), sum(e.read(q) for e in experts) / 3, atol=1e-5)


def test_cli_errors_are_one_line(hf_zoo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergewise.cli import app

    data = yaml.safe_load(recipe(hf_zoo).read_text())
    for m in data["models"]:
        del m["calibration"]
    (hf_zoo / "nocal.yaml").write_text(yaml.safe_dump(data))
    runner = CliRunner()
    for args in (["features", str(hf_zoo / "nocal.yaml")],
                 ["merge", str(hf_zoo / "nocal.yaml"), "--out", str(tmp_path / "o")],
                 ["features", str(recipe(hf_zoo))]):  # no features: paths and no --out-dir
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lot_and_regmean_on_cuda_match_cpu(zoo) -> None:
    base, experts, stats = zoo
    for method in ("lot", "regmean"):
        cpu = merge_state_dicts(base.state_dict(), experts, method, features=stats)
        gpu = merge_state_dicts(base.state_dict(), experts, method, features=stats, device="cuda")
        for k in cpu:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-5)
