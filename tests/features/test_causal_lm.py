"""Causal-LM calibration: padded tokens add nothing to a Llama's Grams, packing of short texts
into max_length rows, and the device check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergewise import FeatureError
from mergewise.features import calibration_batches, capture, draw_examples
from mergewise.features.capture import check_device
from mergewise.features.packing import packed_rows

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def test_right_padding_adds_nothing_to_a_causal_lm_s_grams() -> None:
    model = tiny_llama()
    a, b = torch.tensor([[3, 9, 4, 1, 7, 2]]), torch.tensor([[5, 8, 6]])
    padded = {"input_ids": torch.tensor([[3, 9, 4, 1, 7, 2], [5, 8, 6, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])}
    together = capture(model, [padded])
    apart = capture(model, [{"input_ids": a}, {"input_ids": b}])
    assert together.shared == apart.shared and "model.layers.0.self_attn.k_proj" in apart.shared
    for m in together.layers:
        assert together.rows(m) == apart.rows(m) == 9, m
        key = f"gram:{m}" if together.layers[m].kind == "linear" else f"energy:{m}"
        torch.testing.assert_close(together.tensor(key), apart.tensor(key), rtol=1e-5,
                                   atol=1e-6, msg=m)
    # what a padded position would have added: the mask is what keeps it out
    unmasked = capture(model, [{"input_ids": padded["input_ids"]}])
    assert unmasked.rows("model.layers.0.mlp.down_proj") == 12


def test_packed_rows_cut_the_stream_at_max_length() -> None:
    rows, firsts, real = packed_rows([[1, 5, 6], [1, 7], [1, 8, 9, 2]], [4, 0, 2], 4, eos=2, pad=0)
    # each text ends with eos (2) unless it already does; the last row is padded
    assert rows == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 2, 0]]
    assert firsts == [4, 0, 2] and real == 11
    assert packed_rows([[3, 4]], [0], 8, eos=None, pad=9)[0] == [[3, 4, 9, 9, 9, 9, 9, 9]]
    with pytest.raises(FeatureError, match="pack: the calibration texts hold no tokens"):
        packed_rows([[]], [0], 4, eos=None, pad=0)


class WordTokenizer:
    """Words -> ids 3.. (BOS 1, EOS 2, no pad token), as a Hugging Face tokenizer is called."""

    bos_token_id, eos_token_id, eos_token, pad_token = 1, 2, "</s>", None
    pad_token_id = None

    def __call__(self, texts: list[str], **kw: object) -> dict[str, object]:
        ids = [[1] + [3 + len(w) for w in t.split()] for t in texts]
        if kw.get("padding"):
            width = max(len(r) for r in ids)
            return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r))
                                                    for r in ids])}
        return {"input_ids": ids}


def test_packing_texts_into_batches(tmp_path: Path) -> None:
    texts = ["a bb", "ccc", "dd e ffff", "g"]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    tok = WordTokenizer()
    batches = calibration_batches(tmp_path / "t.txt", num_examples=4, batch_size=2, max_length=5,
                                  seed=0, tokenizer=tok, pack=True)
    drawn = [texts[i] for i in draw_examples(4, 4, 0)]
    stream = [t for text in drawn for t in tok([text])["input_ids"][0] + [2]]  # type: ignore[index]
    ids = torch.cat([b["input_ids"] for b in batches])  # type: ignore[index]
    mask = torch.cat([b["attention_mask"] for b in batches])  # type: ignore[index]
    assert ids.shape == (3, 5) and [b["input_ids"].shape[0] for b in batches] == [2, 1]  # type: ignore[index]
    assert ids[mask.bool()].tolist() == stream  # every token of every text, none truncated
    assert mask.sum() == len(stream) == 15 and mask[:2].all()
    assert tok.pad_token == "</s>"  # a tokenizer without a pad token pads with eos
    with pytest.raises(FeatureError, match="tensor calibration data is already in rows"):
        torch.save(torch.zeros(2, 3, dtype=torch.long), tmp_path / "x.pt")
        calibration_batches(tmp_path / "x.pt", pack=True)


def test_a_packed_capture_counts_every_token(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("a bb\nccc dd\ne\nffff gg h")
    batches = calibration_batches(tmp_path / "t.txt", num_examples=4, batch_size=8,
                                  max_length=4, seed=0, tokenizer=WordTokenizer(), pack=True)
    stats = capture(tiny_llama(), batches)
    assert stats.rows("model.layers.1.self_attn.q_proj") == 4 + 4 + 3 + 5


@pytest.mark.parametrize("device,needle", [
    ("gpu", "device 'gpu' is not cpu, cuda or cuda:N"),
    ("cpu:1", "device 'cpu:1' is not cpu, cuda or cuda:N"),
    ("cuda:x", "device 'cuda:x' is not cpu, cuda or cuda:N"),
])
def test_a_bad_device_is_a_one_line_error(device: str, needle: str) -> None:
    with pytest.raises(FeatureError, match=needle):
        check_device(device)
    check_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_a_one_line_error() -> None:
    with pytest.raises(FeatureError, match="torch sees no CUDA device; use --device cpu"):
        check_device("cuda")


def _word_level_llama(root: Path) -> Path:
    """A tiny Llama directory with a saved word-level tokenizer (t3..t39), for `features`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 40)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
    tiny_llama().save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return root


def test_a_packed_fisher_predicts_every_token_of_every_row(tmp_path: Path) -> None:
    from mergewise.features.fisher import capture_fisher_expert, fisher_capture

    (tmp_path / "t.txt").write_text("a bb\nccc dd\ne\nffff gg h")
    batches = calibration_batches(tmp_path / "t.txt", num_examples=4, batch_size=8,
                                  max_length=4, seed=0, tokenizer=WordTokenizer(), pack=True)
    model = tiny_llama()
    packed = fisher_capture(model, batches, labels="argmax")
    assert packed.metadata["examples"] == "4" and packed.metadata["rows"] == str(4 + 4 + 3 + 5)
    # the same as each packed row given alone, trimmed to its real tokens
    rows = [{"input_ids": b["input_ids"][r:r + 1, :int(b["attention_mask"][r].sum())]}  # type: ignore[index]
            for b in batches for r in range(b["input_ids"].shape[0])]  # type: ignore[index]
    alone = fisher_capture(model, rows, labels="argmax")
    for k in packed.keys():
        torch.testing.assert_close(packed.tensor(k), alone.tensor(k), rtol=1e-4, atol=1e-10)
    # through `features`' capture: a saved model and tokenizer, pack recorded in the file
    model_dir = _word_level_llama(tmp_path / "m")
    (tmp_path / "w.txt").write_text("t3 t4 t5\nt6 t7\nt8 t9 t10 t11 t12\nt13")
    stats, report = capture_fisher_expert(model_dir, tmp_path / "w.txt", num_examples=4,
                                          max_length=6, labels="argmax", pack=True)
    # 4 texts of words + eos (this tokenizer adds no bos) = 4 + 3 + 6 + 2 = 15 tokens, packed
    # into rows of 6: 3 examples (6, 6, 3 tokens), every token a prediction
    assert report.examples == 3 and report.rows == 15
    assert json.loads(stats.metadata["calibration"])["pack"] is True
    _, unpacked = capture_fisher_expert(model_dir, tmp_path / "w.txt", num_examples=4,
                                        max_length=6, labels="argmax")
    assert unpacked.examples == 4 and unpacked.rows == 3 + 2 + 5 + 1  # one row each, truncated


def test_a_fisher_file_is_reused_only_with_the_same_packing(tmp_path: Path) -> None:
    from mergewise.features.fisher import FISHER
    from mergewise.features.sources import obtain, plan_sources
    from mergewise.recipe import parse_recipe

    model_dir = _word_level_llama(tmp_path / "m")
    (tmp_path / "w.txt").write_text("t3 t4 t5\nt6 t7\nt8 t9 t10 t11 t12\nt13")

    def plan(pack: bool) -> list:
        cal = {"data": "w.txt", "num_examples": 4, "max_length": 6, "labels": "argmax",
               **({"pack": True} if pack else {})}
        rec = parse_recipe({"merge_method": "fisher", "models": [
            {"model": "m", "name": "m", "features": "stats/m.safetensors", "calibration": cal}]})
        return plan_sources(rec, tmp_path, [model_dir])

    (stats,), (report,) = obtain(plan(True), seed=0, root=tmp_path, kind=FISHER)
    assert report.rows == 15 and json.loads(stats.metadata["calibration"])["pack"] is True
    (_,), again = obtain(plan(True), seed=0, root=tmp_path, kind=FISHER)
    assert again == []  # reused
    with pytest.raises(FeatureError, match=r"\(pack differ\)"):
        obtain(plan(False), seed=0, root=tmp_path, kind=FISHER)
