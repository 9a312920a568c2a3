"""Capture on plain torch modules (no transformers): the float64 accumulators every layer kind gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergewise import FeatureError, merge_state_dicts
from mergewise.features import capture, capture_experts
from mergewise.features.capture import _Accumulator


def test_norm_energy_is_of_the_normalized_input() -> None:
    ln = nn.LayerNorm(3)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    xhat = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    stats = capture(nn.Sequential(ln), [x])
    torch.testing.assert_close(stats.energy("0"), (xhat.double() ** 2).sum(0))
    assert stats.rows("0") == 2


def test_rmsnorm_energy() -> None:
    norm = nn.RMSNorm(2, eps=0.0)
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])  # rms 3.5355 and 1: x̂ = x / rms
    stats = capture(nn.Sequential(norm), [x])
    want = (x.double() / torch.sqrt((x.double() ** 2).mean(1, keepdim=True))) ** 2
    torch.testing.assert_close(stats.energy("0"), want.sum(0))
    assert stats.for_tensor("0.weight", (2,)).kind == "scale"  # type: ignore[union-attr]


def test_conv2d_gram_through_unfold() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=1, padding=1)
    x = torch.randn(2, 2, 4, 4)
    stats = capture(nn.Sequential(conv), [x])
    cols = nn.functional.unfold(x, 2, padding=1).transpose(1, 2).reshape(-1, 8).double()
    torch.testing.assert_close(stats.gram("0"), cols.T @ cols)
    assert stats.rows("0") == cols.shape[0]
    feat = stats.for_tensor("0.weight", (3, 2, 2, 2))
    assert feat is not None and feat.kind == "matmul"


class FusedQKV(nn.Module):
    """One Linear produces Q, K and V (split afterwards), as open_clip's in_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.out = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(6, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out(att @ v)


def test_fused_projection_is_one_unit() -> None:
    torch.manual_seed(0)
    base = FusedQKV()
    g = torch.Generator().manual_seed(1)
    sds, stats, inputs = [], [], []
    for k in range(2):
        sd = {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.state_dict().items()}
        model = FusedQKV()
        model.load_state_dict(sd)
        x = torch.zeros(8, 5, 6)
        x[..., 3 * k:3 * k + 3] = torch.randn(8, 5, 3, generator=g)  # orthogonal input spaces
        sds.append(sd)
        inputs.append(x)
        stats.append(capture(model, [x]))
    merged = merge_state_dicts(base.state_dict(), sds, "lot", features=stats)
    # orthogonal row spaces: the merged fused projection reproduces each expert's Q, K and V
    for sd, x in zip(sds, inputs, strict=True):
        delta = sd["qkv.weight"] - base.state_dict()["qkv.weight"]
        got = merged["qkv.weight"] - base.state_dict()["qkv.weight"]
        torch.testing.assert_close(x @ got.T, x @ delta.T, rtol=1e-4, atol=1e-4)


class Conv1D(nn.Module):
    """The layout of transformers' GPT-2 ``Conv1D`` (recognised by class name): x @ W + b with
    W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_gpt2_conv1d_weight_is_stored_in_out() -> None:
    torch.manual_seed(0)
    stats = capture(nn.Sequential(Conv1D(5, 3)), [torch.ones(2, 4, 3), torch.randn(1, 7, 3)])
    assert stats.layers["0"].layout == "in_out"
    assert stats.rows("0") == 2 * 4 + 7
    feat = stats.for_tensor("0.weight", (3, 5))
    assert feat is not None and feat.kind == "matmul" and feat.in_out
    assert feat.gram is not None and feat.gram.shape == (3, 3)
    with pytest.raises(FeatureError, match=r"'0' has a 3-wide Gram but tensor '0.weight' has shape \[5, 3\]"):
        stats.for_tensor("0.weight", (5, 3))  # an (out, in) tensor does not fit Conv1D statistics


class SharedInput(nn.Module):
    """Q, K and V projections of the very same input tensor (as Hugging Face attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum() + self.k(x).sum() + self.v(x).sum()


def test_a_shared_input_gram_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    rows_of = _Accumulator.rows_of

    def counted(self: _Accumulator, x: torch.Tensor, feature_dims: int) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return rows_of(self, x, feature_dims)

    monkeypatch.setattr(_Accumulator, "rows_of", counted)
    x = torch.randn(3, 5, 4)
    stats = capture(SharedInput(), [x, x.clone()])
    assert seen == [(3, 5, 4), (3, 5, 4)]  # one Gram a batch, not one a projection
    rows = x.reshape(-1, 4).double()
    for name in ("q", "k", "v"):
        torch.testing.assert_close(stats.gram(name), 2 * rows.T @ rows)
        assert stats.rows(name) == 30
    # stored once: k and v read q's Gram (the very same tensor), each layer keeps its rows
    assert stats.shared == {"k": "q", "v": "q"}
    assert stats.keys() == ["rows:q", "gram:q", "rows:k", "rows:v"]
    assert stats.gram("q") is stats.gram("k") is stats.gram("v")
    unshared = capture(SharedInput(), [x, x.clone()], share_grams=False)
    assert unshared.shared == {} and unshared.gram("q") is not unshared.gram("k")
    assert all(torch.equal(unshared.gram(n), stats.gram(n)) for n in ("q", "k", "v"))


class TinyEncoder(nn.Module):
    """Token inputs with a mask: a per-token Linear and LayerNorm, a pooler on the first token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.dense = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.pooler = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.norm(self.dense(self.embed(input_ids)))[:, 0])


def test_padded_tokens_are_excluded_from_a_plain_module() -> None:
    torch.manual_seed(0)
    model = TinyEncoder()
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    ids = torch.randint(1, 10, (3, 6)) * mask
    stats = capture(model, [{"input_ids": ids, "attention_mask": mask}])
    assert stats.rows("dense") == stats.rows("norm") == 12  # the real tokens
    assert stats.rows("pooler") == 3  # (batch, hidden) input: one row per example
    assert stats.metadata["examples"] == "3" and "embed" not in stats.layers
    with torch.no_grad():
        real = model.embed(ids)[mask.bool()].double()
    torch.testing.assert_close(stats.gram("dense"), real.T @ real)


class Branches(nn.Module):
    """Layers without statistics: other norms, grouped and padding="same" convolutions, a branch
    that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.BatchNorm2d(2),
                                  nn.Conv2d(2, 2, 3, padding="same"), nn.GroupNorm(1, 2),
                                  nn.Flatten(), nn.Linear(32, 3), nn.LayerNorm(3, elementwise_affine=False))
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layers_without_statistics_follow_the_fallback() -> None:
    model = Branches().train()
    modes: list[bool] = []
    model.body[5].register_forward_pre_hook(lambda m, args: modes.append(m.training))
    stats = capture(model, [torch.randn(2, 2, 6, 6)])
    assert set(stats.layers) == {"body.5"}
    assert stats.for_tensor("unused.weight", (3, 3)) is None  # never ran: not stored
    assert stats.for_tensor("body.1.weight", (2,)) is None
    assert modes == [False] and model.training  # run in eval mode, the flag restored
    with pytest.raises(FeatureError, match="has no Linear, Conv2d or norm layer"):
        capture(nn.Sequential(nn.ReLU()), [torch.zeros(1)])


def test_a_failing_forward_removes_the_hooks() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(3, 1)).train()  # the second does not fit
    with pytest.raises(RuntimeError):
        capture(model, [torch.zeros(1, 2)])
    assert all(not m._forward_pre_hooks for m in model.modules()) and model.training


def test_capture_experts_restores_the_module_and_needs_every_task() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    experts = {t: {k: v + 0.1 * (i + 1) for k, v in before.items()} for i, t in enumerate("ab")}
    batches = {"a": [torch.randn(4, 3)], "b": [torch.randn(5, 3)]}
    got = capture_experts(module, experts, batches)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    for t in "ab":  # the very same statistics as a module of its own
        alone = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
        alone.load_state_dict(experts[t])
        want = capture(alone, batches[t], label=t)
        assert got[t].keys() == want.keys()
        assert all(torch.equal(got[t].tensor(k), want.tensor(k)) for k in want.keys())
        assert got[t].metadata["probe"] == want.metadata["probe"]
    with pytest.raises(FeatureError, match="no calibration batches for task"):
        capture_experts(module, experts, {"a": batches["a"]})
