"""Fisher merging end to end on tiny random Hugging Face models built here: a BERT sequence
classifier (text calibration, `mergewise features` then `mergewise merge`) and a Llama causal LM
(per-token Fisher, padding masked, tied embeddings). Needs transformers (the bench extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_cli

from mergewise.checkpoint import open_checkpoint
from mergewise.features.fisher import fisher_capture
from mergewise.features.fisherfile import load_fisher

transformers = pytest.importorskip("transformers", reason="the tiny-HF Fisher tests need transformers")

TASKS = ("alpha", "beta")
VOCAB = 40


def tiny_classifier(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, type_vocab_size=1, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def write_tokenizer(directory: Path) -> None:
    words = [f"w{i}" for i in range(VOCAB - 5)]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(directory))


def perturbed(model, scale: float, g: torch.Generator):
    """An expert: ``model`` with seeded Gaussian noise added to every parameter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fisher_bert")
    base = tiny_classifier(0)
    base.save_pretrained(str(root / "base"))
    write_tokenizer(root / "base")
    g = torch.Generator().manual_seed(1)
    for k, task in enumerate(TASKS):
        perturbed(tiny_classifier(0), 0.3, g).save_pretrained(str(root / task))
        lines = [json.dumps({"text": " ".join(f"w{k * 15 + int(i)}" for i in
                                               torch.randint(0, 15, (int(n),), generator=g))})
                 for n in torch.randint(2, 8, (20,), generator=g)]
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def recipe(root: Path, features: bool, **parameters: object) -> Path:
    models = []
    for task in TASKS:
        entry: dict = {"model": task, "calibration": {"data": f"{task}.jsonl", "num_examples": 6,
                                                      "max_length": 10, "batch_size": 4}}
        if features:
            entry["features"] = f"stats/{task}.safetensors"
        models.append(entry)
    data = {"merge_method": "fisher", "tokenizer_source": "base", "models": models,
            "parameters": parameters}
    path = root / f"fisher-{features}-{len(parameters)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_features_then_merge_is_the_fisher_weighted_average(classifiers: Path,
                                                                 tmp_path: Path) -> None:
    result = run_cli("features", recipe(classifiers, True))
    assert result.exit_code == 0, result.output
    assert "alpha: 6 examples, 6 rows" in result.output
    stats = [load_fisher(classifiers / "stats" / f"{t}.safetensors") for t in TASKS]
    assert stats[0].metadata["labels"] == "expected"  # 3 classes: auto takes the expectation
    assert json.loads(stats[0].metadata["calibration"])["labels"] == "auto"
    result = run_cli("merge", recipe(classifiers, True), "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    out = open_checkpoint(tmp_path / "m")
    experts = [open_checkpoint(classifiers / t) for t in TASKS]
    eps = 1e-6
    checked = 0
    for name in out.names():
        if not out.read(name).is_floating_point():
            continue
        feats = [s.for_tensor(name, out.info(name).shape) for s in stats]
        values = [e.read(name).double() for e in experts]
        if all(f is None for f in feats):
            want = sum(values) / 2
        else:
            ws = [(f.fisher.double() + eps) / (f.norm + eps) for f in feats]
            want = sum(w * v for w, v in zip(ws, values, strict=True)) / sum(ws)
        torch.testing.assert_close(out.read(name).double(), want, rtol=1e-5, atol=1e-6)
        checked += feats[0] is not None
    assert checked >= 10
    # a merge that captures into a temporary directory gives the very same tensors
    direct = run_cli("merge", recipe(classifiers, False), "--out", tmp_path / "d")
    assert direct.exit_code == 0, direct.output
    again = open_checkpoint(tmp_path / "d")
    assert all(torch.equal(again.read(n), out.read(n)) for n in out.names())
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert {r.get("unit") for r in report["tensors"] if r.get("merged")} >= {"fisher"}


def test_padding_is_masked_for_a_classifier(classifiers: Path) -> None:
    model = transformers.BertForSequenceClassification.from_pretrained(str(classifiers / "alpha"))
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 9, 10, 11, 12, 3]])
    mask = (ids != 0).long()
    padded = fisher_capture(model, [{"input_ids": ids, "attention_mask": mask}])
    alone = fisher_capture(model, [{"input_ids": ids[:1, :4], "attention_mask": mask[:1, :4]},
                                   {"input_ids": ids[1:], "attention_mask": mask[1:]}])
    for k in padded.keys():
        torch.testing.assert_close(padded.tensor(k), alone.tensor(k), rtol=1e-4, atol=1e-9)


def tiny_lm(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_causal_lm_per_token_fisher_and_merge(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    model = tiny_lm(0)
    padded = fisher_capture(model, [{"input_ids": ids, "attention_mask": mask}], labels="argmax")
    assert padded.metadata["rows"] == str(int(mask.sum())) == "20"  # every real token predicts
    trimmed = [{"input_ids": ids[r:r + 1, :int(mask[r].sum())],
                "attention_mask": mask[r:r + 1, :int(mask[r].sum())]} for r in range(4)]
    alone = fisher_capture(model, trimmed, labels="argmax")
    for k in padded.keys():
        torch.testing.assert_close(padded.tensor(k), alone.tensor(k), rtol=1e-4, atol=1e-10)
    assert "model.embed_tokens.weight" in padded.shapes
    assert padded.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    # the CLI on two LM experts with tensor calibration data and sampled labels
    for task in TASKS:
        perturbed(tiny_lm(0), 0.2, g).save_pretrained(str(tmp_path / task))
        torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / f"{task}.pt")
    data = {"merge_method": "fisher", "parameters": {"normalize": False},
            "models": [{"model": t, "parameters": {"weight": 1.0 + k},
                        "calibration": {"data": f"{t}.pt", "num_examples": 4, "labels": "sample"}}
                       for k, t in enumerate(TASKS)]}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(data))
    result = run_cli("merge", tmp_path / "lm.yaml", "--out", tmp_path / "lm")
    assert result.exit_code == 0, result.output
    out = open_checkpoint(tmp_path / "lm")
    a, b = (open_checkpoint(tmp_path / t) for t in TASKS)
    name = "model.norm.weight"
    merged, va, vb = out.read(name), a.read(name), b.read(name)
    lo, hi = torch.minimum(va, vb), torch.maximum(va, vb)
    assert bool(((merged >= lo - 1e-6) & (merged <= hi + 1e-6)).all())
    assert not torch.allclose(merged, (va + 2 * vb) / 3, atol=1e-5)  # Fisher-weighted, not plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fisher_on_cuda_matches_cpu(classifiers: Path) -> None:
    model = transformers.BertForSequenceClassification.from_pretrained(str(classifiers / "alpha"))
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 9, 10, 11, 12, 3]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    cpu = fisher_capture(model, [batch])
    gpu = fisher_capture(model.to("cuda"), [batch])
    for k in cpu.keys():
        torch.testing.assert_close(gpu.tensor(k), cpu.tensor(k), rtol=1e-3, atol=1e-9)
