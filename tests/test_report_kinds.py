"""Module kinds and layer depth from real tensor names (Llama, BERT, GPT-2), and the per-kind /
per-task summaries of the report on hand-made rows.

Expected kinds are what a user reading a per-kind table expects (BERT's embedding LayerNorm is a
norm; a bare GPT2Model/LlamaModel's block names still carry their layer index); rows without a
kept count (``mergewise inspect``) are left out of realised drop rates.
"""

from __future__ import annotations

import pytest

from mergewise.report import kind_summary, layer_index, module_kind, task_summary

LLAMA = [
    ("model.embed_tokens.weight", "embedding", None),
    ("model.layers.3.self_attn.q_proj.weight", "attn_q", 3),
    ("model.layers.3.self_attn.k_proj.weight", "attn_k", 3),
    ("model.layers.3.self_attn.v_proj.weight", "attn_v", 3),
    ("model.layers.3.self_attn.o_proj.weight", "attn_o", 3),
    ("model.layers.3.mlp.gate_proj.weight", "mlp_gate", 3),
    ("model.layers.3.mlp.up_proj.weight", "mlp_up", 3),
    ("model.layers.3.mlp.down_proj.weight", "mlp_down", 3),
    ("model.layers.3.input_layernorm.weight", "norm", 3),
    ("model.layers.3.post_attention_layernorm.weight", "norm", 3),
    ("model.layers.31.mlp.down_proj.weight", "mlp_down", 31),
    ("model.norm.weight", "norm", None),
    ("lm_head.weight", "head", None),
    # LlamaModel.save_pretrained (no ``model.`` prefix)
    ("embed_tokens.weight", "embedding", None),
    ("norm.weight", "norm", None),
    ("layers.3.self_attn.q_proj.weight", "attn_q", 3),
]

BERT = [
    ("bert.embeddings.word_embeddings.weight", "embedding", None),
    ("bert.embeddings.position_embeddings.weight", "embedding", None),
    ("bert.embeddings.token_type_embeddings.weight", "embedding", None),
    ("bert.embeddings.LayerNorm.weight", "norm", None),
    ("bert.embeddings.LayerNorm.bias", "norm", None),
    ("bert.encoder.layer.0.attention.self.query.weight", "attn_q", 0),
    ("bert.encoder.layer.0.attention.self.key.weight", "attn_k", 0),
    ("bert.encoder.layer.0.attention.self.value.weight", "attn_v", 0),
    # biases (other than a norm's) are their own kind, whatever module they belong to
    ("bert.encoder.layer.0.attention.self.query.bias", "bias", 0),
    ("bert.encoder.layer.0.attention.self.key.bias", "bias", 0),
    ("bert.encoder.layer.0.attention.self.value.bias", "bias", 0),
    ("bert.encoder.layer.0.attention.output.dense.weight", "attn_o", 0),
    ("bert.encoder.layer.0.attention.output.dense.bias", "bias", 0),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "norm", 0),
    ("bert.encoder.layer.0.attention.output.LayerNorm.bias", "norm", 0),
    ("bert.encoder.layer.0.intermediate.dense.weight", "mlp_up", 0),
    ("bert.encoder.layer.0.intermediate.dense.bias", "bias", 0),
    # the block's output.dense is the FFN down projection, not attention.output.dense
    ("bert.encoder.layer.0.output.dense.weight", "mlp_down", 0),
    ("bert.encoder.layer.0.output.dense.bias", "bias", 0),
    ("bert.encoder.layer.0.output.LayerNorm.weight", "norm", 0),
    ("bert.encoder.layer.11.output.dense.weight", "mlp_down", 11),
    ("bert.pooler.dense.weight", "head", None),
    ("bert.pooler.dense.bias", "bias", None),
    ("classifier.weight", "head", None),
    ("classifier.bias", "bias", None),
    # BertModel.save_pretrained (no ``bert.`` prefix; the benchmark's MiniLM experts)
    ("embeddings.word_embeddings.weight", "embedding", None),
    ("encoder.layer.5.attention.self.query.weight", "attn_q", 5),
    ("encoder.layer.5.output.dense.weight", "mlp_down", 5),
    ("embeddings.LayerNorm.weight", "norm", None),
]

GPT2 = [
    ("transformer.wte.weight", "embedding", None),
    ("transformer.wpe.weight", "embedding", None),
    ("transformer.h.0.ln_1.weight", "norm", 0),
    ("transformer.h.0.ln_1.bias", "norm", 0),
    ("transformer.h.0.attn.c_attn.weight", "attn_qkv", 0),
    ("transformer.h.0.attn.c_attn.bias", "bias", 0),
    # c_proj of attention is the output projection, c_proj of the MLP the down projection
    ("transformer.h.0.attn.c_proj.weight", "attn_o", 0),
    ("transformer.h.0.attn.c_proj.bias", "bias", 0),
    ("transformer.h.0.ln_2.weight", "norm", 0),
    ("transformer.h.0.mlp.c_fc.weight", "mlp_up", 0),
    ("transformer.h.0.mlp.c_proj.weight", "mlp_down", 0),
    ("transformer.h.0.mlp.c_proj.bias", "bias", 0),
    ("transformer.h.11.mlp.c_proj.weight", "mlp_down", 11),
    ("transformer.ln_f.weight", "norm", None),
    ("transformer.ln_f.bias", "norm", None),
    ("lm_head.weight", "head", None),
    # GPT2Model.save_pretrained (no ``transformer.`` prefix)
    ("wte.weight", "embedding", None),
    ("ln_f.weight", "norm", None),
    ("h.0.ln_1.weight", "norm", 0),
    ("h.0.attn.c_attn.weight", "attn_qkv", 0),
    ("h.0.attn.c_proj.weight", "attn_o", 0),
    ("h.0.mlp.c_fc.weight", "mlp_up", 0),
    ("h.0.mlp.c_proj.weight", "mlp_down", 0),
]


def _ids(cases):
    return [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in cases]


@pytest.mark.parametrize(("name", "kind", "layer"), _ids(LLAMA + BERT + GPT2))
def test_kind_and_layer_of_real_tensor_names(name, kind, layer):
    assert (module_kind(name), layer_index(name)) == (kind, layer)


@pytest.mark.parametrize(("name", "kind"), [
    ("layers.3.self_attn.q_proj.weight", "attn_q"), ("h.0.ln_1.weight", "norm"),
    ("h.0.attn.c_attn.weight", "attn_qkv"), ("h.0.attn.c_proj.weight", "attn_o"),
    ("h.0.mlp.c_fc.weight", "mlp_up"), ("h.0.mlp.c_proj.weight", "mlp_down")])
def test_kind_without_the_wrapper_prefix(name, kind):
    """The unprefixed names of a bare base model keep their kinds."""
    assert module_kind(name) == kind


def test_unknown_names():
    assert module_kind("some.custom.thing") == "other"
    assert module_kind("some.custom.bias") == "bias"
    assert layer_index("some.custom.thing") is None


# ---------------------------------------------------------------- summaries
def _row(task, tensor, kind, numel, d, kept, rescale):
    return {"task": task, "tensor": tensor, "kind": kind, "numel": numel, "d": d, "kept": kept,
            "rescale": rescale}


# two tasks, two kinds; task b's only tensor was never measured (kept None), one of task a's
# tensors has no d / rescale (TADrop skipped it)
ROWS = [
    _row("a", "model.layers.0.input_layernorm.weight", "norm", 16, 0.25, 16, 1.0),
    _row("b", "model.layers.0.self_attn.q_proj.weight", "attn_q", 200, 1.0, None, 4.0),
    _row("a", "model.layers.0.self_attn.q_proj.weight", "attn_q", 100, 0.5, 40, 2.0),
    _row("a", "model.layers.1.self_attn.q_proj.weight", "attn_q", 300, None, 60, None),
]


def test_kind_summary_exact_numbers():
    out = kind_summary(ROWS)
    assert [(s["task"], s["kind"]) for s in out] == [("a", "attn_q"), ("a", "norm"), ("b", "attn_q")]
    a_attn, a_norm, b_attn = out
    # None d / rescale are left out of the means (not averaged in as 0)
    assert a_attn == {"task": "a", "kind": "attn_q", "tensors": 2, "numel": 400, "mean_d": 0.5,
                      "realised_drop_rate": 0.75, "mean_rescale": 2.0}
    assert a_norm == {"task": "a", "kind": "norm", "tensors": 1, "numel": 16, "mean_d": 0.25,
                      "realised_drop_rate": 0.0, "mean_rescale": 1.0}
    assert {k: b_attn[k] for k in ("tensors", "numel", "mean_d", "mean_rescale")} == {
        "tensors": 1, "numel": 200, "mean_d": 1.0, "mean_rescale": 4.0}


def test_task_summary_exact_numbers():
    out = task_summary(ROWS)
    assert [s["task"] for s in out] == ["a", "b"]  # first appearance
    a = out[0]
    assert a["numel"] == 416 and out[1]["numel"] == 200
    assert a["realised_drop_rate"] == pytest.approx(1.0 - 116 / 416, rel=1e-15)




def test_no_known_kept_gives_no_realised_drop_rate():
    assert kind_summary(ROWS)[2]["realised_drop_rate"] is None
    assert task_summary(ROWS)[1]["realised_drop_rate"] is None


def test_unknown_kept_is_left_out_of_the_rate():
    rows = [_row("a", "x.q_proj.weight", "attn_q", 100, 0.5, 40, 1.0),
            _row("a", "y.q_proj.weight", "attn_q", 300, 0.5, None, 1.0)]
    assert kind_summary(rows)[0]["realised_drop_rate"] == pytest.approx(0.6)
    assert task_summary(rows)[0]["realised_drop_rate"] == pytest.approx(0.6)
