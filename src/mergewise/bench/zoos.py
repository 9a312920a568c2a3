"""One table over several expert zoos: every row as mean ± s.d., every claimed gain paired.

Why: a row's test average moves by about a point between fine-tuning seeds, as much as the
differences between methods, so a single zoo cannot tell methods apart. Each zoo is run with
the one-zoo protocol (hyperparameters selected on that zoo's validation splits); this module
only combines the per-zoo documents. The claims checked are the papers': "X + TADrop beats X"
for every X with a TADrop row, and "LOT beats the best data-free method", where the best
data-free row is chosen by mean *validation* average over zoos (a single-encoder, data-free
merge: no feature statistics, not task-specific), never by test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..registry import METHODS
from .spread import mean_sd, paired_gain, unbits

TADROP = "+tadrop"
LOT_ROWS = ("lot", "lot" + TADROP)


def _labels(docs: list[dict[str, Any]]) -> list[str]:
    labels = [r["label"] for r in docs[0]["rows"]]
    for d in docs[1:]:
        if [r["label"] for r in d["rows"]] != labels:
            raise ValueError("the zoos' documents have different rows; run the same methods on each")
    return labels


def _data_free(row: dict[str, Any]) -> bool:
    if row["kind"] not in ("merge", "tadrop") or row.get("method") not in METHODS:
        return False
    m = METHODS.get(row["method"])
    return not m.features and not m.task_specific


def _union(docs: list[dict[str, Any]]) -> list[str]:
    """Every row label: the zoo with the most rows in its order, then the others' extra rows as
    they come (each run lists its rows in its --methods order)."""
    labels: list[str] = []
    for d in sorted(docs, key=lambda d: -len(d["rows"])):  # stable: equals keep seed order
        labels += [r["label"] for r in d["rows"] if r["label"] not in labels]
    return labels


def claims(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(row, baseline) pairs: X+tadrop vs X; each LOT row vs the best data-free row on mean
    validation over the zoos that ran that LOT row, among the rows every one of them ran."""
    labels = _union(docs)
    out = [(lab, lab.removesuffix(TADROP)) for lab in labels
           if lab.endswith(TADROP) and lab.removesuffix(TADROP) in labels]
    by_label = [{r["label"]: r for r in d["rows"]} for d in docs]
    for lot in (lab for lab in LOT_ROWS if lab in labels):
        zoos = [z for z in by_label if lot in z]
        free = [lab for lab in labels if all(lab in z and _data_free(z[lab]) for z in zoos)]
        if free:
            out.append((lot, max(free, key=lambda lab: sum(z[lab]["val_average"] for z in zoos))))
    return out  # the best: the first of equals


def combine(docs: list[dict[str, Any]], seeds: list[int], every_row: bool = False) -> dict[str, Any]:
    """The combined document: per-row spreads and per-claim paired statistics. The zoos must
    have the same rows unless ``every_row``: then each row is pooled over the zoos that ran it
    (its ``zoo_seeds``) and each claim over the zoos that ran both of its rows."""
    if not every_row:
        _labels(docs)
    elif not any(r.get("kind") in ("merge", "tadrop") for d in docs for r in d["rows"]):
        raise ValueError("the zoos' documents have no merged row")
    tasks = docs[0]["tasks"]
    by_label = [{r["label"]: r for r in d["rows"]} for d in docs]
    rows = []
    for lab in _union(docs):
        have = [(s, z[lab]) for s, z in zip(seeds, by_label, strict=True) if lab in z]
        zs = [z for _, z in have]
        row: dict[str, Any] = {"label": lab, "kind": zs[0]["kind"], "zoo_seeds": [s for s, _ in have],
                               "selected": [z.get("selected") for z in zs]}
        for key in ("average", "normalized"):
            row[key], row[key + "_sd"] = mean_sd([z[key] for z in zs])
        row["test"] = {t: mean_sd([z["test"][t] for z in zs]) for t in tasks}
        rows.append(row)
    gains = []
    for lab, base in claims(docs):
        both = [(s, z) for s, z in zip(seeds, by_label, strict=True) if lab in z and base in z]
        if not both:  # never run side by side (--all-rows): nothing to pair
            continue
        a = [unbits(z[lab]["test_bits"]) for _, z in both]
        b = [unbits(z[base]["test_bits"]) for _, z in both]
        gains.append({"row": lab, "baseline": base, "zoo_seeds": [s for s, _ in both],
                      **paired_gain(a, b, seed=0)})
    return {"zoo_seeds": seeds, "tasks": tasks, "test_sizes": docs[0]["test_sizes"],
            "rows": rows, "gains": gains, "seconds": round(sum(d["seconds"] for d in docs), 1)}


def zoo_seed(doc: dict[str, Any]) -> int | None:
    """The training seed of a one-zoo document (``config.run.zoo.train.seed``), or None."""
    try:
        seed = doc["config"]["run"]["zoo"]["train"]["seed"]
    except (KeyError, TypeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _protocol(doc: dict[str, Any], with_methods: bool = True) -> Any:
    """A zoo's run settings without its training seed: what must agree for zoos to be pooled
    (without the methods list when only the rows the zoos share are pooled)."""
    run = json.loads(json.dumps(doc["config"]["run"]))
    run["zoo"]["train"].pop("seed", None)
    if not with_methods:
        run.pop("methods", None)
    return run


def common_rows(docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each document cut to the rows every one of them has (in the first one's order), and the
    labels dropped. A row is selected on its own zoo's validation splits, whatever other rows
    ran, so a shared row pools as it would in full runs (same grids: ``_protocol``)."""
    shared = set.intersection(*({r["label"] for r in d["rows"]} for d in docs))
    if not any(r["label"] in shared and r.get("kind") in ("merge", "tadrop")
               for r in docs[0]["rows"]):
        raise ValueError("the zoos' documents share no merged row; run some of the same methods")
    dropped = sorted({r["label"] for d in docs for r in d["rows"]} - shared)
    order = [r["label"] for r in docs[0]["rows"] if r["label"] in shared]  # runs list rows in
    # the order of their --methods, which need not agree between zoos
    by_label = [{r["label"]: r for r in d["rows"]} for d in docs]
    return [{**d, "rows": [z[lab] for lab in order]} for d, z in zip(docs, by_label, strict=True)], dropped


def read_zoo_docs(paths: list[Path], shared_rows: bool = False
                  ) -> tuple[list[dict[str, Any]], list[int]]:
    """One-zoo ``results.json`` documents (a file, or the directory holding it) run apart —
    other sessions, other machines — checked poolable: each a one-zoo document with its seed,
    distinct seeds, the same tasks, test sets, rows and run settings but for the seed
    (``shared_rows``: the rows may differ and the methods list is not compared; cut them with
    ``common_rows``). Bad input is a ``ValueError`` naming the file and the problem. Returned
    in seed order."""
    docs: list[tuple[int, dict[str, Any], Path]] = []
    for given in paths:
        path = given / "results.json" if given.is_dir() else given
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (give a results.json or its directory)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable JSON document ({exc})") from None
        if isinstance(doc, dict) and "zoo_seeds" in doc:
            raise ValueError(f"{path}: a combined table, not one zoo's results.json (give the "
                             "zoo-S/ documents it was made from)")
        seed = zoo_seed(doc) if isinstance(doc, dict) else None
        if seed is None or not all(k in doc for k in ("tasks", "test_sizes", "rows", "seconds")):
            raise ValueError(f"{path}: not one zoo's results.json from `mergewise bench run` "
                             "(no tasks, test sizes, rows or zoo seed)")
        docs.append((seed, doc, path))
    if len(docs) < 2:
        raise ValueError("give at least two zoos' results to combine")
    docs.sort(key=lambda x: x[0])
    _, first, first_path = docs[0]
    for (seed, _, path), (before, _, other) in zip(docs[1:], docs, strict=False):
        if seed == before:
            raise ValueError(f"{path}: zoo seed {seed} again (also {other}); each zoo once")
    for _, doc, path in docs[1:]:
        for key, what in (("tasks", "tasks"), ("test_sizes", "test set sizes")):
            if doc[key] != first[key]:
                raise ValueError(f"{path}: other {what} than {first_path} ({doc[key]} vs {first[key]})")
        if not shared_rows and [r.get("label") for r in doc["rows"]] != [
                r.get("label") for r in first["rows"]]:
            raise ValueError(f"{path}: other rows than {first_path}; run the same --methods on "
                             "each zoo (or pool the rows they share: --shared-rows)")
        if _protocol(doc, not shared_rows) != _protocol(first, not shared_rows):
            raise ValueError(f"{path}: run with other settings than {first_path} (grids, steps, "
                             "limits or methods differ; only the zoo seed may)")
    return [d for _, d, _ in docs], [s for s, _, _ in docs]


def _pm(mean: float, sd: float, alone: bool = False) -> str:
    return f"{100 * mean:.1f}" if alone else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _zoos(seeds: list[int]) -> str:
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def markdown(doc: dict[str, Any]) -> str:
    tasks = doc["tasks"]
    n = len(doc["zoo_seeds"])
    some = any(len(r.get("zoo_seeds", doc["zoo_seeds"])) < n for r in doc["rows"])  # --all-rows
    head = ["row", *tasks, "avg", "norm", *(["zoos (seeds)"] if some else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in doc["rows"]:
        ran = r.get("zoo_seeds", doc["zoo_seeds"])
        one = len(ran) == 1  # no s.d. from one value
        cells = [r["label"], *(_pm(*r["test"][t], one) for t in tasks),
                 _pm(r["average"], r["average_sd"], one), _pm(r["normalized"], r["normalized_sd"], one)]
        if some:
            cells.append(_zoos(ran))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test accuracy in %, mean ± s.d. over {n} zoos (seeds "
              f"{', '.join(map(str, doc['zoo_seeds']))})"
              + ("; a row run on fewer zoos is pooled over those (its zoos column), a claim over "
                 "the zoos that ran both rows (per zoo: in seed order)" if some else "")
              + "; hyperparameters selected on each zoo's validation splits (per zoo: "
              "zoo-S/results.md).", "",
              "| claim | gain (mean ± s.d. over zoos) | per zoo | zoos > 0 | bootstrap s.d. | "
              "bootstrap 95 % | P(gain <= 0) |", "|---|---:|---|---:|---:|---|---:|"]
    for g in doc["gains"]:
        lo, hi = g["bootstrap_ci95"]
        zs = g.get("zoo_seeds", [])
        seeds = f" (seed{'s' * (len(zs) > 1)} {', '.join(map(str, zs))})" if some and zs else ""
        spread = "" if g["zoos"] == 1 else f" ± {100 * g['gain_sd_zoos']:.2f}"
        lines.append(f"| {g['row']} vs {g['baseline']} | {100 * g['gain']:+.2f}{spread} | "
                     + ", ".join(f"{100 * x:+.2f}" for x in g["per_zoo"]) + seeds
                     + f" | {g['zoos_positive']}/{g['zoos']} | {100 * g['bootstrap_sd']:.2f} | "
                     f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {g['bootstrap_p_le_0']:.3f} |")
    lines += ["", "Gains in points of test average. Bootstrap: each task's test examples resampled "
              f"({doc['gains'][0]['bootstrap_reps'] if doc['gains'] else 0} draws, seed 0), the same "
              "draw for both rows and every zoo; the mean over zoos of the gain per draw."]
    if doc.get("rows_not_in_every_zoo"):
        lines += ["", "Not pooled (run on some zoos only): "
                  + ", ".join(doc["rows_not_in_every_zoo"]) + "."]
    return "\n".join(lines) + "\n"


def write_combined(out: Path, doc: dict[str, Any]) -> None:
    """``results.json`` and ``results.md`` of the combined zoos, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(doc, indent=1) + "\n"), ("results.md", markdown(doc))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
