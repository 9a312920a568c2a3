"""``bench combine``: zoos run apart (other sessions, other machines) pooled into one table with
spreads and paired gains, after checking they are poolable; every refusal names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mergewise.bench.zoos import read_zoo_docs, zoo_seed
from mergewise.cli import app

REPO = Path(__file__).resolve().parents[2]


def _row(label: str, kind: str, method: str | None, avg: float, val: float | None,
         test_bits: str | None = None) -> dict[str, Any]:
    r = {"label": label, "kind": kind, "method": method, "average": avg, "normalized": avg / 0.8,
         "test": {"t": avg}, "val_average": val, "selected": {"parameters": {}, "sparsify": None}}
    return {**r, "test_bits": {"t": test_bits}} if test_bits else r


def _doc(seed: int, tadrop_bits: str = "1110", density: float = 0.2) -> dict[str, Any]:
    rows = [_row("experts (each on its own task)", "experts", None, 0.8, None),
            _row("ties", "merge", "ties", 0.5, 0.6, "1100"),
            _row("ties+tadrop", "tadrop", "ties", tadrop_bits.count("1") / 4, 0.5, tadrop_bits)]
    config = {"run": {"zoo": {"train": {"steps": 300, "seed": seed}}, "grids": {"density": density},
                      "methods": ["ties", "ties+tadrop"]},
              "experts": {"t": f"key{seed}"}}
    return {"mergewise_version": "0.1.0", "tasks": ["t"], "test_sizes": {"t": 4},
            "val_sizes": {"t": 4}, "config": config, "rows": rows, "skipped": [], "seconds": 5.0}


def _write(tmp: Path, name: str, doc: Any) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(doc))
    return d


def _invoke(*args: object) -> Any:
    return CliRunner().invoke(app, ["bench", "combine", *map(str, args)])


def test_two_zoos_run_apart_pool_into_spreads_and_paired_gains(tmp_path: Path) -> None:
    one = _write(tmp_path, "one", _doc(1, "1111"))
    zero = _write(tmp_path, "zero", _doc(0, "1110"))
    res = _invoke(one, zero / "results.json", "--out", tmp_path / "pooled")  # any order
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert doc["zoo_seeds"] == [0, 1] and doc["seconds"] == 10.0
    gain = doc["gains"][0]
    assert (gain["row"], gain["baseline"]) == ("ties+tadrop", "ties")
    assert gain["per_zoo"] == pytest.approx([0.25, 0.5]) and gain["zoos_positive"] == 2
    md = (tmp_path / "pooled" / "results.md").read_text()
    assert "| ties+tadrop | 87.5 ± 17.7 |" in md and "mean ± s.d. over 2 zoos (seeds 0, 1)" in md


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d, "zoo seed 0 again"),
    (lambda d: {**d, "rows": d["rows"][:2]}, "other rows than"),
    (lambda d: {**d, "tasks": ["u"]}, "other tasks than"),
    (lambda d: {**d, "test_sizes": {"t": 5}}, "other test set sizes than"),
    (lambda d: {**d, "zoo_seeds": [0, 1]}, "a combined table, not one zoo's"),
    (lambda d: {k: v for k, v in d.items() if k != "rows"}, "not one zoo's results.json"),
])
def test_zoos_that_cannot_be_pooled_are_refused(tmp_path: Path, edit: Any, message: str) -> None:
    good = _write(tmp_path, "good", _doc(0))
    bad = _write(tmp_path, "bad", edit(_doc(0 if message.startswith("zoo seed") else 1)))
    res = _invoke(good, bad, "--out", tmp_path / "o")
    assert res.exit_code == 1 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_other_settings_missing_files_and_garbage_name_the_file(tmp_path: Path) -> None:
    good = _write(tmp_path, "good", _doc(0))
    other = _write(tmp_path, "other", _doc(1, density=0.4))
    res = _invoke(good, other)
    assert res.exit_code == 1 and "run with other settings" in res.output
    assert "other" in res.output
    res = _invoke(good, tmp_path / "nowhere")
    assert res.exit_code == 1 and "no such file" in res.output
    (tmp_path / "junk.json").write_text("{not json")
    res = _invoke(good, tmp_path / "junk.json")
    assert res.exit_code == 1 and "not a readable JSON document" in res.output
    (tmp_path / "list.json").write_text("[1, 2]")
    res = _invoke(good, tmp_path / "list.json")
    assert res.exit_code == 1 and "not one zoo's results.json" in res.output
    res = _invoke(good)
    assert res.exit_code == 1 and "at least two zoos" in res.output


def test_the_committed_seed_zero_document_is_a_poolable_zoo(tmp_path: Path) -> None:
    """The issue 16 rows of zoo 0, kept in git: later zoos' runs pool with it."""
    path = REPO / "docs" / "bench-results" / "issue16-seed0" / "results.json"
    doc = json.loads(path.read_text())
    assert zoo_seed(doc) == 0
    one = json.loads(json.dumps(doc))
    one["config"]["run"]["zoo"]["train"]["seed"] = 1
    docs, seeds = read_zoo_docs([path, _write(tmp_path, "one", one)])
    assert seeds == [0, 1] and docs[0] is not docs[1]



def test_shared_rows_pool_zoos_run_with_different_methods(tmp_path: Path) -> None:
    """``--shared-rows``: a zoo that ran fewer methods pools the rows every zoo has; the rest is
    listed, and without the flag the difference is refused as before."""
    full = _write(tmp_path, "full", _doc(0, "1110"))
    fewer = _doc(1, "1111")
    fewer["rows"] = [r for r in fewer["rows"] if r["label"] != "ties"]
    fewer["config"]["run"]["methods"] = ["ties+tadrop"]
    part = _write(tmp_path, "part", fewer)
    res = _invoke(full, part, "--out", tmp_path / "refused")
    assert res.exit_code == 1 and "--shared-rows" in res.output
    res = _invoke(full, part, "--shared-rows", "--out", tmp_path / "pooled")
    assert res.exit_code == 0, res.output
    assert "not pooled (not in every zoo): ties" in res.output
    doc = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["experts (each on its own task)", "ties+tadrop"]
    assert doc["rows_not_in_every_zoo"] == ["ties"] and doc["gains"] == []
    assert doc["rows"][1]["average"] == pytest.approx(0.875)
    assert "Not pooled (run on some zoos only): ties." in (tmp_path / "pooled" / "results.md").read_text()
    other = _doc(1, density=0.4)  # other grids are still refused
    other["rows"] = other["rows"][:2]
    res = _invoke(full, _write(tmp_path, "other", other), "--shared-rows")
    assert res.exit_code == 1 and "run with other settings" in res.output
    nothing = _doc(1)
    nothing["rows"] = nothing["rows"][:1]
    res = _invoke(full, _write(tmp_path, "nothing", nothing), "--shared-rows")
    assert res.exit_code == 1 and "share no merged row" in res.output


def test_shared_rows_pool_zoos_whose_runs_listed_the_methods_in_another_order(tmp_path: Path) -> None:
    """Each run lists its rows in its --methods order: the shared rows are matched by label
    and pooled in the first zoo's order, not refused as "different rows"."""
    zero = _doc(0, "1110")
    one = _doc(1, "1111")
    one["rows"] = [one["rows"][0], one["rows"][2], one["rows"][1],
                   _row("tsv", "merge", "tsv", 0.25, 0.3, "1000")]
    one["config"]["run"]["methods"] = ["ties+tadrop", "ties", "tsv"]
    res = _invoke(_write(tmp_path, "zero", zero), _write(tmp_path, "one", one), "--shared-rows",
                  "--out", tmp_path / "pooled")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["experts (each on its own task)", "ties", "ties+tadrop"]
    assert doc["rows_not_in_every_zoo"] == ["tsv"]
    assert doc["rows"][1]["average"] == pytest.approx(0.5)  # ties with ties, not with ties+tadrop
    gain = doc["gains"][0]
    assert (gain["row"], gain["baseline"]) == ("ties+tadrop", "ties")
    assert gain["per_zoo"] == pytest.approx([0.25, 0.5])


def test_all_rows_pool_each_row_over_the_zoos_that_ran_it(tmp_path: Path) -> None:
    """``--all-rows``: a row run on fewer zoos is pooled over those (its zoos listed), each
    claim is paired over the zoos that ran both rows, and nothing is dropped."""
    zero = _doc(0, "1110")
    zero["rows"] = [zero["rows"][0], _row("tsv", "merge", "tsv", 0.25, 0.3, "1000")]
    zero["config"]["run"]["methods"] = ["tsv"]
    one = _doc(1, "1111")
    two = _doc(2, "1000")
    two["rows"].append(_row("tsv", "merge", "tsv", 0.75, 0.9, "1110"))  # best val, on zoo 2 only
    for d in (one, two):
        d["rows"].append(_row("lot", "merge", "lot", 1.0, 0.4, "1111"))
    paths = [_write(tmp_path, n, d) for n, d in (("zero", zero), ("one", one), ("two", two))]
    res = _invoke(*paths, "--all-rows", "--shared-rows")
    assert res.exit_code == 1 and "give one" in res.output
    res = _invoke(*paths, "--all-rows", "--out", tmp_path / "pooled")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "pooled" / "results.json").read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert [r["label"] for r in doc["rows"]] == ["experts (each on its own task)", "ties",
                                                 "ties+tadrop", "tsv", "lot"]  # fullest zoo's order
    assert rows["ties"]["zoo_seeds"] == [1, 2] and rows["tsv"]["zoo_seeds"] == [0, 2]
    assert rows["experts (each on its own task)"]["zoo_seeds"] == [0, 1, 2]
    assert rows["tsv"]["average"] == pytest.approx(0.5)
    gain = doc["gains"][0]
    assert (gain["row"], gain["baseline"], gain["zoo_seeds"]) == ("ties+tadrop", "ties", [1, 2])
    assert gain["per_zoo"] == pytest.approx([0.5, -0.25]) and gain["zoos_positive"] == 1
    md = (tmp_path / "pooled" / "results.md").read_text()
    assert "| tsv | 50.0 ± 35.4 | 50.0 ± 35.4 | 62.5 ± 44.2 | 2 (0, 2) |" in md
    assert "+50.00, -25.00 (seeds 1, 2) | 1/2 |" in md
    assert "| lot | 100.0 ± 0.0 |" in md  # two zoos: a spread, even of 0
    one_zoo = _invoke(paths[0], paths[1], "--all-rows", "--out", tmp_path / "two")
    md = (tmp_path / "two" / "results.md").read_text()
    assert "| ties | 50.0 | 50.0 | 62.5 | 1 (1) |" in md  # one zoo: no s.d.
    assert "| lot vs ties | +50.00 | +50.00 (seed 1) | 1/1 |" in md and one_zoo.exit_code == 0
    lot = doc["gains"][1]  # against the best data-free row of every zoo that ran LOT, on val
    assert (lot["row"], lot["baseline"], lot["zoo_seeds"]) == ("lot", "ties", [1, 2])
    broken = _doc(3)
    del broken["rows"][1]["test_bits"]
    res = _invoke(paths[1], _write(tmp_path, "broken", broken), "--all-rows")
    assert res.exit_code == 1 and "per-example results" in res.output


def test_all_rows_skip_a_claim_whose_rows_never_ran_in_the_same_zoo(tmp_path: Path) -> None:
    zero, one = _doc(0, "1110"), _doc(1, "1111")
    zero["rows"] = zero["rows"][:2]  # ties only
    one["rows"] = [one["rows"][0], one["rows"][2]]  # ties+tadrop only
    res = _invoke(_write(tmp_path, "zero", zero), _write(tmp_path, "one", one), "--all-rows",
                  "--out", tmp_path / "pooled")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert doc["gains"] == [] and [r["zoo_seeds"] for r in doc["rows"]] == [[0, 1], [0], [1]]
