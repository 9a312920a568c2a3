"""Shared Grams: layers that read one input (q/k/v, gate/up) store one Gram and share one solve,
with the very same merged weights as one Gram and one solve each; float32 accumulation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mergewise import FeatureError, merge_state_dicts
from mergewise.features import FeatureStats, capture, load_stats
from mergewise.methods import lot as lot_module


class Block(nn.Module):
    """A Llama-shaped block: RMSNorm, q/k/v of one input, o, gate/up of one input, down."""

    def __init__(self, d: int = 6, f: int = 10) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        x = x + self.o(att)
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


SHARED = {"k": "q", "v": "q", "up": "gate"}


def experts(n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]],
                                 list[list[torch.Tensor]]]:
    """A base, ``n`` perturbed experts and each one's calibration batches (seeded)."""
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Block().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    sds = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
           for _ in range(n)]
    data = [[torch.randn(2, 5, 6, generator=g) for _ in range(2)] for _ in range(n)]
    return base, sds, data


def captured(sds: list[dict[str, torch.Tensor]], data: list[list[torch.Tensor]],
             **kw: object) -> list[FeatureStats]:
    out = []
    for k, (sd, batches) in enumerate(zip(sds, data, strict=True)):
        model = Block()
        model.load_state_dict(sd)
        out.append(capture(model, batches, label=f"t{k}", **kw))  # type: ignore[arg-type]
    return out


def test_projections_of_one_input_store_one_gram(tmp_path: Path) -> None:
    _, sds, data = experts(1)
    stats = captured(sds, data)[0]
    assert stats.shared == SHARED
    path = stats.save(tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        names, meta = set(f.keys()), f.metadata()
    assert {n for n in names if n.startswith("gram:")} == {"gram:q", "gram:o", "gram:gate",
                                                           "gram:down"}
    assert json.loads(meta["shared_grams"]) == SHARED
    loaded = load_stats(path)
    assert loaded.shared == SHARED
    # one read, one object for the whole group: what lets the solve be shared
    assert loaded.gram("k") is loaded.gram("q") is loaded.gram("v")
    assert torch.equal(loaded.gram("up"), stats.gram("gate"))
    feat = loaded.for_tensor("v.weight", (6, 6))
    assert feat is not None and feat.shared_gram == "gram:q" and feat.rows == 20
    assert loaded.for_tensor("o.weight", (6, 6)).shared_gram is None  # type: ignore[union-attr]
    unshared = captured(sds, data, share_grams=False)[0]
    for m in ("q", "k", "v", "o", "gate", "up", "down"):
        assert torch.equal(unshared.gram(m), loaded.gram(m)), m
    loaded.close()


@pytest.mark.parametrize("method,params", [("lot", {}), ("lot", {"tasks": "equal"}),
                                           ("regmean", {}), ("regmean", {"alpha": 1.0})])
def test_shared_solves_give_the_unshared_weights(method: str, params: dict[str, object],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, sds, data = experts()
    calls = {"n": 0}
    for fn in ("pinv", "lu_factor_ex"):
        real = getattr(torch.linalg, fn)

        def counted(*a: object, _real=real, **k: object) -> object:
            calls["n"] += 1
            return _real(*a, **k)
        monkeypatch.setattr(torch.linalg, fn, counted)
    got = merge_state_dicts(base, sds, method, features=captured(sds, data), parameters=params)
    shared_solves, calls["n"] = calls["n"], 0
    want = merge_state_dicts(base, sds, method, features=captured(sds, data, share_grams=False),
                             parameters=params)
    assert (shared_solves, calls["n"]) == (4, 7)  # q/k/v, o, gate/up, down vs one per weight
    assert all(torch.equal(got[n], want[n]) for n in want), \
        [n for n in want if not torch.equal(got[n], want[n])]


def test_regmean_lu_solve_is_the_plain_solve() -> None:
    base, sds, data = experts()
    stats = captured(sds, data)
    got = merge_state_dicts(base, sds, "regmean", features=stats, parameters={"alpha": 0.9})
    for name in ("q", "down"):
        grams = [s.gram(name) / s.rows(name) for s in stats]
        grams = [0.9 * g + 0.1 * torch.diag(torch.diagonal(g)) for g in grams]
        cross = sum(sd[f"{name}.weight"].double() @ g for sd, g in zip(sds, grams, strict=True))
        want = torch.linalg.solve(sum(grams), cross.T).T  # type: ignore[arg-type]
        torch.testing.assert_close(got[f"{name}.weight"].double(), want.float().double(),
                                   rtol=0, atol=1e-6)


def test_a_format_1_file_still_merges_the_same(tmp_path: Path) -> None:
    base, sds, data = experts(2)
    files = []
    for k, st in enumerate(captured(sds, data, share_grams=False)):
        path = st.save(tmp_path / f"{k}.safetensors")
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        meta = {**meta, "mergewise_features": "1"}
        del meta["shared_grams"]
        save_file(tensors, str(path), metadata=meta)
        files.append(path)
    old = [load_stats(p) for p in files]
    assert all(s.shared == {} for s in old)
    want = merge_state_dicts(base, sds, "lot", features=captured(sds, data))
    got = merge_state_dicts(base, sds, "lot", features=old)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("shared,needle", [
    ('{"k": "nowhere"}', "maps 'k': 'nowhere'"),
    ('{"k": "v", "v": "q"}', "maps 'k': 'v'"),
    ('["k"]', "maps ['k']"),
    ("{", "metadata 'shared_grams' is missing or not JSON"),
])
def test_a_garbled_shared_map_is_refused_in_one_line(tmp_path: Path, shared: str,
                                                     needle: str) -> None:
    _, sds, data = experts(1)
    path = captured(sds, data)[0].save(tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**meta, "shared_grams": shared})
    with pytest.raises(FeatureError, match=r"^[^\n]*" + needle.replace("[", r"\[")
                       .replace("{", r"\{")) as info:
        load_stats(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_missing_shared_gram_is_refused(tmp_path: Path) -> None:
    _, sds, data = experts(1)
    path = captured(sds, data)[0].save(tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys() if n != "gram:q"}  # noqa: SIM118
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FeatureError, match="layer 'q' has no 'gram:q' tensor"):
        load_stats(path)


class Routed(nn.Module):
    """a reads x; b reads ``route(call number, x)``: x itself in some batches, not in others."""

    def __init__(self, route: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.route, self.calls = route, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a(x) + self.b(self.route(self.calls, x))


def switching() -> nn.Module:
    """b reads a's input in the first batch only: its Gram cannot be a's."""
    return Routed(lambda call, x: x if call == 1 else x + 1)


class OnceMore(nn.Module):
    """b reads a's input, and once more on its own input: a's Gram would miss a term."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.b(x * 2)


@pytest.mark.parametrize("model", [switching, OnceMore])
def test_an_inconsistent_sharing_is_a_one_line_error(model: Callable[[], nn.Module]) -> None:
    x = torch.randn(4, 3)
    with pytest.raises(FeatureError, match=r"^m: layer 'b' read the input of 'a' in .*"
                       "share_grams=False"):
        capture(model(), [x, x.clone()], label="m")
    stats = capture(model(), [x, x.clone()], label="m", share_grams=False)
    assert stats.shared == {}


def test_a_layer_on_a_shared_input_it_did_not_share_adds_its_own_gram() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    late = Routed(lambda call, x: x if call > 1 else x * 2).double()  # b shares from batch 2 on
    stats = capture(late, [x, x.clone()])
    assert stats.shared == {}
    torch.testing.assert_close(stats.gram("b"), 4 * x.T @ x + x.T @ x, rtol=1e-12, atol=0)


def test_a_solve_is_dropped_with_its_grams() -> None:
    base, sds, data = experts(2)
    stats = captured(sds, data)
    lot_module.SOLVES._entries.clear()
    merge_state_dicts(base, sds, "lot", features=stats)
    assert len(lot_module.SOLVES) == 2  # q's and gate's groups
    del stats
    assert len(lot_module.SOLVES) == 0


def test_float32_accumulation(tmp_path: Path) -> None:
    base, sds, data = experts(2)
    f32 = captured(sds, data, accumulate="float32")
    f64 = captured(sds, data)
    assert f32[0].gram("q").dtype == torch.float32 and f32[0].energy("norm").dtype == torch.float64
    torch.testing.assert_close(f32[0].gram("down").double(), f64[0].gram("down"), rtol=1e-6,
                               atol=1e-5)
    paths = [s.save(tmp_path / f"{k}.safetensors") for k, s in enumerate(f32)]
    loaded = [load_stats(p) for p in paths]
    assert loaded[0].metadata["accumulate"] == "float32"
    assert loaded[0].gram("k").dtype == torch.float32
    got = merge_state_dicts(base, sds, "lot", features=loaded)
    want = merge_state_dicts(base, sds, "lot", features=f64)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
    with pytest.raises(FeatureError, match=r"^t0: accumulate is 'float16'; use float64 or float32"):
        captured(sds[:1], data[:1], accumulate="float16")


def test_a_float32_gram_in_a_float64_file_is_refused(tmp_path: Path) -> None:
    _, sds, data = experts(1)
    path = captured(sds, data)[0].save(tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    tensors["gram:o"] = tensors["gram:o"].float()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FeatureError, match=r"tensor 'gram:o' is float32 \[6, 6\], expected "
                       r"float64 \(n, n\)"):
        load_stats(path)
    save_file(tensors, str(path), metadata={**meta, "accumulate": "bfloat16"})
    with pytest.raises(FeatureError, match="metadata 'accumulate' = 'bfloat16' is not float64"):
        load_stats(path)


def test_statistics_built_without_their_shared_map_say_what_is_missing() -> None:
    _, sds, data = experts(1)
    stats = captured(sds, data)[0]
    partial = FeatureStats(stats.layers, {k: stats.tensor(k) for k in stats.keys()},
                           label="partial")  # the shared map forgotten: k has no Gram
    with pytest.raises(FeatureError, match="partial: no statistics 'gram:k'; the stats file is "
                       "incomplete"):
        partial.for_tensor("k.weight", (6, 6))


def test_stats_files_share_the_solves_in_checkpoint_order(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Safetensors lists names sorted (k, o, q, v; down, gate, up): o between k and q, and the
    files read lazily, must still give one pseudo-inverse per shared Gram."""
    base, sds, data = experts(2)
    paths = [s.save(tmp_path / f"{k}.safetensors") for k, s in enumerate(captured(sds, data))]
    calls = []
    real = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda *a, **k: calls.append(1) or real(*a, **k))
    ordered = [dict(sorted(sd.items())) for sd in sds]
    got = merge_state_dicts(dict(sorted(base.items())), ordered, "lot",
                            features=[str(p) for p in paths])
    assert len(calls) == 4
    want = merge_state_dicts(base, sds, "lot", features=captured(sds, data, share_grams=False))
    assert all(torch.equal(got[n], want[n]) for n in want)
