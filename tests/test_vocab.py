"""Tokenizers that differ (mergekit's tokenizer_source / tokenizer: block): union and base
vocabularies, embedding and head rows aligned by token with mergekit's rule for missing tokens,
padding, per-token overrides, and the written tokenizer and config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_helpers import load_dir, write_recipe
from safetensors.torch import save_file

from mergewise import ShapeMismatchError, merge

HIDDEN = 4
BASE_TOKENS = [f"t{i}" for i in range(8)]


def _write(directory: Path, tokens: list[str], seed: int, extra_added: dict | None = None) -> Path:
    """A tiny HF directory: embeddings / head with one row per token, a WordLevel tokenizer."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    v = len(tokens)
    tensors = {"model.embed_tokens.weight": torch.randn(v, HIDDEN, generator=g),
               "model.layers.0.mlp.up_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
               "model.norm.weight": torch.randn(HIDDEN, generator=g),
               "lm_head.weight": torch.randn(v, HIDDEN, generator=g)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v,
        "hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": HIDDEN}))
    added = [{"id": 0, "content": tokens[0], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    (directory / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)},
                  "unk_token": tokens[0]}}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"unk_token": tokens[0]}))
    return directory


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {"base": _write(root / "base", BASE_TOKENS, 0),
            "m1": _write(root / "m1", BASE_TOKENS, 1),
            "m2": _write(root / "m2", [*BASE_TOKENS, "x0", "x1"], 2),
            # m3: the base tokens in another order, plus x1
            "m3": _write(root / "m3", [*BASE_TOKENS[::-1], "x1"], 3)}


def _run(zoo, tmp_path, name: str, **recipe) -> tuple[dict[str, torch.Tensor], Path]:
    data = {"base_model": str(zoo["base"]), "dtype": "float32", **recipe}
    out = tmp_path / name
    merge(write_recipe(tmp_path / f"{name}.yaml", data), out)
    return load_dir(out), out


def _row(zoo, model: str, token: str, tensor: str = "model.embed_tokens.weight") -> torch.Tensor:
    tokens = json.loads((zoo[model] / "tokenizer.json").read_text())["model"]["vocab"]
    return load_dir(zoo[model])[tensor][tokens[token]]


def test_union_rows_follow_mergekits_rule(zoo, tmp_path) -> None:
    """linear over m1, m2, m3: x0 only m2 has (its row is every other model's), x1 m2 and m3
    have and the base lacks (their mean); t* rows are matched by token, not by id."""
    out, out_dir = _run(zoo, tmp_path, "union", merge_method="linear",
                        models=[str(zoo[m]) for m in ("m1", "m2", "m3")],
                        tokenizer_source="union")
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[tensor].shape == (10, HIDDEN)
        for i, tok in enumerate(BASE_TOKENS):
            want = sum(_row(zoo, m, tok, tensor) for m in ("m1", "m2", "m3")) / 3
            torch.testing.assert_close(out[tensor][i], want, rtol=0, atol=1e-6)
        x0 = _row(zoo, "m2", "x0", tensor)
        torch.testing.assert_close(out[tensor][8], x0, rtol=0, atol=1e-6)
        x1 = (_row(zoo, "m2", "x1", tensor) + _row(zoo, "m3", "x1", tensor)) / 2
        torch.testing.assert_close(out[tensor][9], x1, rtol=0, atol=1e-6)
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 10
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    assert tok["model"]["vocab"] == {t: i for i, t in enumerate(BASE_TOKENS)}
    assert [(e["id"], e["content"]) for e in tok["added_tokens"][1:]] == [(8, "x0"), (9, "x1")]


def test_union_with_a_base_that_has_the_token(zoo, tmp_path) -> None:
    """task_arithmetic: a token the base has but one expert lacks takes the base's row there,
    so that expert's task vector is 0 on it."""
    out, _ = _run(zoo, tmp_path, "ta", merge_method="task_arithmetic",
                  models=[str(zoo["m2"]), str(zoo["m3"])], tokenizer_source="union")
    emb = "model.embed_tokens.weight"
    base = load_dir(zoo["base"])[emb]
    # t0..t7: both experts have them (m3 under other ids): base + both task vectors
    for i, t in enumerate(BASE_TOKENS):
        want = base[i] + (_row(zoo, "m2", t) - base[i]) + (_row(zoo, "m3", t) - base[i])
        torch.testing.assert_close(out[emb][i], want, rtol=0, atol=1e-6)
    # x0: only m2 has it, the base gets m2's row (donor): m2's vector 0, m3 gets the donor row
    # too, so the merged row is the donor row
    torch.testing.assert_close(out[emb][8], _row(zoo, "m2", "x0"), rtol=0, atol=1e-6)


def test_base_vocabulary_and_padding(zoo, tmp_path) -> None:
    out, out_dir = _run(zoo, tmp_path, "pad", merge_method="linear",
                        models=[str(zoo["m2"]), str(zoo["m3"])],
                        tokenizer={"source": "base", "pad_to_multiple_of": 5})
    emb = out["model.embed_tokens.weight"]
    assert emb.shape == (10, HIDDEN)  # 8 base tokens padded to 10
    for i, t in enumerate(BASE_TOKENS):
        want = (_row(zoo, "m2", t) + _row(zoo, "m3", t)) / 2
        torch.testing.assert_close(emb[i], want, rtol=0, atol=1e-6)
    # padding rows: each model's mean aligned row, then merged (linear: their mean)
    m2 = torch.stack([_row(zoo, "m2", t) for t in BASE_TOKENS]).mean(0)
    m3 = torch.stack([_row(zoo, "m3", t) for t in BASE_TOKENS]).mean(0)
    torch.testing.assert_close(emb[8], (m2 + m3) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[9], emb[8], rtol=0, atol=0)
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 10


def test_token_overrides(zoo, tmp_path) -> None:
    out, _ = _run(zoo, tmp_path, "tokens", merge_method="linear",
                  models=[str(zoo["m2"]), str(zoo["m3"])],
                  tokenizer={"source": "union", "tokens": {
                      "x1": {"source": {"kind": "zero"}, "force": True},
                      "x0": {"source": {"kind": "model_token", "model": str(zoo["m3"]),
                                        "token": "t2"}}}})
    emb = out["model.embed_tokens.weight"]
    assert torch.equal(emb[9], torch.zeros(HIDDEN))  # forced zero for every model
    # x0: m2 has it (its own row); m3 lacks it and takes its own row of t2
    want = (_row(zoo, "m2", "x0") + _row(zoo, "m3", "t2")) / 2
    torch.testing.assert_close(emb[8], want, rtol=0, atol=1e-6)


def test_written_tokenizer_loads(zoo, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    _, out_dir = _run(zoo, tmp_path, "load", merge_method="linear",
                      models=[str(zoo["m1"]), str(zoo["m2"])], tokenizer_source="union")
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    assert len(tok) == 10
    assert tok("t1 x1 x0")["input_ids"] == [1, 9, 8]


def test_different_vocabularies_need_a_tokenizer_setting(zoo, tmp_path) -> None:
    with pytest.raises(ShapeMismatchError, match="lm_head.weight"):
        _run(zoo, tmp_path, "plain", merge_method="linear",
             models=[str(zoo["m1"]), str(zoo["m2"])])


def test_chat_template(zoo, tmp_path) -> None:
    _, out_dir = _run(zoo, tmp_path, "chatml", merge_method="linear",
                      models=[str(zoo["m1"])], chat_template="chatml")
    assert "<|im_start|>" in (out_dir / "chat_template.jinja").read_text()
    raw = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, out_dir = _run(zoo, tmp_path, "raw", merge_method="linear",
                      models=[str(zoo["m1"])], chat_template=raw)
    assert (out_dir / "chat_template.jinja").read_text() == raw
    from mergewise import RecipeError
    for bad, needle in [("llama3", "does not ship"), ("auto", "none of the models"),
                        ("plain", "neither auto")]:
        with pytest.raises(RecipeError, match=needle):
            _run(zoo, tmp_path, f"bad_{bad}", merge_method="linear",
                 models=[str(zoo["m1"])], chat_template=bad)
        assert not (tmp_path / f"bad_{bad}").exists()
