"""Chunked merging of elementwise methods == the whole-tensor path, bit for bit: merged tensors,
report rows (norms, kept counts), the all-zero rule, and every error (same message).

Chunks are made small (1024 entries) so that small tensors take many of them, with ties at the
top-k threshold, masses of exact zeros and a tensor length that is no multiple of the chunk."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mergewise import NonFiniteError, chunked, merge_state_dicts, numerics

SMALL = 1024


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK", SMALL)
    monkeypatch.setattr(chunked, "MIN_NUMEL", 2 * SMALL)
    monkeypatch.setattr(numerics, "REPORT_CHUNK", SMALL)


def _family(dtype: torch.dtype = torch.bfloat16, experts: int = 3, seed: int = 0
            ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """bf16-quantized task vectors (many tied magnitudes), one 90%-zero tensor, one tensor no
    expert moved, a length that is no multiple of the chunk, a small tensor (whole path)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (37, 113), "b.weight": (64, 96), "zeros.weight": (48, 64),
              "still.weight": (40, 60), "small.bias": (50,)}
    base = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in shapes.items()}
    models = []
    for k in range(experts):
        sd = {}
        for n, s in shapes.items():
            delta = torch.randn(s, generator=g) * 0.01 * (k + 1)
            if n == "zeros.weight":
                delta *= torch.rand(s, generator=g) < 0.1
            if n == "still.weight":
                delta.zero_()
            sd[n] = (base[n].float() + delta).to(dtype)
        models.append(sd)
    return base, models


CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("linear", {}, None),
    ("task_arithmetic", {"lambda": 0.7}, None),
    ("task_arithmetic", {"normalize": True}, None),
    ("ties", {"density": 0.2}, None),
    ("ties", {"density": 0.93, "aggregate": "mean"}, None),
    ("ties", {"density": 0.001}, None),  # T at the very top; zero-mass tensors keep no zero
    ("breadcrumbs", {"density": 0.9, "gamma": 0.01}, None),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.2}, None),
    ("dare_ties", {"density": 0.5}, None),
    ("dare_linear", {"density": 0.3, "rescale_rule": "density"}, None),
    ("della", {"density": 0.4, "epsilon": 0.1}, None),
    ("ties", {}, {"method": "tadrop", "drop_rate": 0.7}),
    ("ties", {}, {"method": "tadrop", "drop_rate": 0.7, "rescale": "none"}),
    ("task_arithmetic", {}, {"method": "tadrop", "drop_rate": 0.9, "strength": 3.0}),
    ("ties", {"aggregate": "mean"}, {"method": "tadrop", "drop_rate": 0.5, "budget": "elements",
                                     "skip": ["b.*"], "max_drop": 0.999}),
    ("dare_ties", {}, {"method": "tadrop", "drop_rate": 0.6, "mode": "random"}),
]


def _run(method: str, params: dict[str, Any], sparsify: dict[str, Any] | None,
         base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], **kw: Any
         ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    model_keys = {"density", "epsilon", "gamma", "rescale_rule"}
    per_model = [{k: v for k, v in params.items() if k in model_keys} for _ in models]
    method_params = {k: v for k, v in params.items() if k not in model_keys}
    out = merge_state_dicts(base, models, method, parameters=method_params,
                            model_parameters=per_model, sparsify=sparsify, seed=3,
                            records=records, dtype=kw.get("dtype", "float32"),
                            out_dtype=kw.get("out_dtype"))
    return out, records


def _whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "applies", lambda job, plan: False)


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def workers(request: pytest.FixtureRequest) -> Any:
    """torch's thread count = the chunk workers (``chunkpool``): 1 is serial, 3 splits the
    chunks (and the models of the selection pass) over threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(("method", "params", "sparsify"), CASES)
def test_chunked_equals_whole_tensor_path(method: str, params: dict[str, Any],
                                          sparsify: dict[str, Any] | None, small_chunks: None,
                                          monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    base, models = _family()
    before = [{n: t.clone() for n, t in sd.items()} for sd in [base, *models]]
    got, got_rows = _run(method, params, sparsify, base, models)
    with monkeypatch.context() as m:
        _whole(m)
        want, want_rows = _run(method, params, sparsify, base, models)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in got_rows]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in want_rows]
    assert torch.equal(got["still.weight"], base["still.weight"])  # nothing moved: the base
    for sd, kept in zip([base, *models], before, strict=True):  # inputs untouched
        assert all(torch.equal(sd[n], kept[n]) for n in sd)


def test_chunked_path_is_taken(small_chunks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = chunked.merge

    def spy(job: Any, plan: Any, params: Any, record: Any) -> Any:
        calls.append(plan.name)
        return real(job, plan, params, record)

    monkeypatch.setattr(chunked, "merge", spy)
    base, models = _family()
    _run("ties", {"density": 0.2}, None, base, models)
    assert set(calls) == {"a.weight", "b.weight", "zeros.weight", "still.weight"}


def _whole_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors whose task vectors ``chunked`` made whole."""
    made: list[str] = []
    real = chunked._Whole.make

    def spy(self: Any, base: torch.Tensor, record: bool) -> bool:
        made.append(self.plan.name)
        return real(self, base, record)

    monkeypatch.setattr(chunked._Whole, "make", spy)
    return made


def test_tadrop_magnitude_is_streamed(small_chunks: None, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    """Only the tensors TADrop keeps as they are (d = 0 or none: drop rate 0) are made whole;
    random mode stays whole."""
    made = _whole_made(monkeypatch)
    base, models = _family()
    _run("ties", {}, {"method": "tadrop", "drop_rate": 0.7}, base, models)
    assert set(made) == {"zeros.weight", "still.weight"}
    made.clear()
    _run("ties", {}, {"method": "tadrop", "drop_rate": 0.7, "mode": "random"}, base, models)
    assert {"a.weight", "b.weight"} <= set(made)


NORMS = {"norm_before", "norm_after"}


@pytest.mark.parametrize("sparsify", [{"method": "tadrop", "drop_rate": 0.8},
                                      {"method": "tadrop", "drop_rate": 0.99, "strength": 0.0}])
@pytest.mark.parametrize("threads", [1, 2])
def test_tadrop_at_the_real_chunk_size(sparsify: dict[str, Any], threads: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of 2.5 chunks of 2^18 (bf16 task vectors: ties at the threshold), streamed,
    against the whole-tensor path bit for bit, report rows included. The report's norms are
    compared on one thread only: a float32 sum of 2^18 entries depends on torch's thread count,
    and the chunked path runs torch on one thread (``chunkpool.cores``); TADrop's own figures
    (d, drop rate, rescale factor, kept counts) and the merged tensors never do."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _real_chunk_case(sparsify, monkeypatch, compare_norms=threads == 1)
    finally:
        torch.set_num_threads(before)


def _real_chunk_case(sparsify: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                     compare_norms: bool) -> None:
    g = torch.Generator().manual_seed(5)
    n = 5 * chunked.CHUNK // 2 + 3
    base = {"big.weight": (torch.randn(n, generator=g) * 0.02).bfloat16(),
            "other.weight": (torch.randn(n - 1000, generator=g) * 0.02).bfloat16()}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g).pow(3) * 1e-3 * (j + 1))
               .bfloat16() for k, v in base.items()} for j in range(3)]
    made = _whole_made(monkeypatch)
    got, got_rows = _run("ties", {}, sparsify, base, models, out_dtype="bfloat16")
    assert made == []
    with monkeypatch.context() as m:
        _whole(m)
        want, want_rows = _run("ties", {}, sparsify, base, models, out_dtype="bfloat16")
    for name in want:
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name

    def rows(records: list[dict[str, Any]]) -> list[Any]:
        drop = {"seconds"} | (set() if compare_norms else NORMS | {"merged_delta_norm"})
        return [{k: ([{f: x for f, x in m.items() if f not in drop} for m in v]
                     if k == "models" else v) for k, v in r.items() if k not in drop}
                for r in records]

    assert rows(got_rows) == rows(want_rows)
    assert all(m["rescale"] != 1.0 and m["kept"] < m_n for r in rows(got_rows)
               for m, m_n in zip(r["models"], [r["numel"]] * 3, strict=True))


def test_float32_inputs_and_half_precision_compute(small_chunks: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _family(torch.float32, seed=1)
    for dtype in ("float32", "bfloat16", "float16"):
        for sparsify in (None, {"method": "tadrop", "drop_rate": 0.6}):
            density = {"density": 0.3} if sparsify is None else {}
            got, got_rows = _run("ties", density, sparsify, base, models, dtype=dtype)
            with monkeypatch.context() as m:
                _whole(m)
                want, want_rows = _run("ties", density, sparsify, base, models, dtype=dtype)
            assert all(torch.equal(got[n], want[n]) for n in want), dtype
            assert [r["models"] for r in got_rows] == [r["models"] for r in want_rows]


@pytest.mark.parametrize("where", ["base", "expert"])
def test_errors_are_the_whole_paths(where: str, small_chunks: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _family()
    target = base if where == "base" else models[1]
    target["b.weight"][50, 7] = float("nan")
    with pytest.raises(NonFiniteError) as got:
        _run("ties", {"density": 0.2}, None, base, models)
    with monkeypatch.context() as m:
        _whole(m)
        with pytest.raises(NonFiniteError) as want:
            _run("ties", {"density": 0.2}, None, base, models)
    assert str(got.value) == str(want.value)


def test_overflowing_out_dtype_is_the_whole_paths_error(small_chunks: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _family(torch.float32)
    for sd in models:
        sd["a.weight"] = sd["a.weight"] * 1e6
    with pytest.raises(NonFiniteError, match="overflows out_dtype float16") as got:
        _run("task_arithmetic", {}, None, base, models, out_dtype="float16")
    with monkeypatch.context() as m:
        _whole(m)
        with pytest.raises(NonFiniteError) as want:
            _run("task_arithmetic", {}, None, base, models, out_dtype="float16")
    assert str(got.value) == str(want.value)


def test_dare_is_streamed_not_made_whole(small_chunks: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """DARE's mask and L1 sums are drawn chunk by chunk: no task vector is made whole."""
    made = _whole_made(monkeypatch)
    base, models = _family()
    _run("dare_ties", {"density": 0.5}, None, base, models)
    assert made == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rule", ["l1", "density"])
def test_dare_half_precision_compute_streamed_equals_whole(dtype: str, rule: str,
                                                           small_chunks: None,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    base, models = _family(torch.float32, seed=2)
    params = {"density": 0.4, "rescale_rule": rule}
    got, got_rows = _run("dare_ties", params, None, base, models, dtype=dtype)
    with monkeypatch.context() as m:
        _whole(m)
        want, want_rows = _run("dare_ties", params, None, base, models, dtype=dtype)
    assert all(torch.equal(got[n], want[n]) for n in want)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in got_rows]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in want_rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16,
                                   torch.int32, torch.bool])
def test_the_kept_count_is_count_nonzero(dtype: torch.dtype) -> None:
    # the report's "kept" figure: NaN and inf count, +0 and -0 do not, in every dtype
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5000, generator=g)
    t[torch.rand(5000, generator=g) < 0.6] = 0.0
    t[:6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), -1e-30])
    t = t.to(dtype) if dtype.is_floating_point else (t * 3).to(dtype)
    assert chunked._nonzero(t) == int(torch.count_nonzero(t))
    if dtype.is_floating_point:
        assert chunked._nonzero(t[:2]) == 0  # +0 and -0
