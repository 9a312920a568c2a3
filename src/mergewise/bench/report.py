"""Benchmark outputs: ``results.json`` (everything), ``results.md`` (the table), ``results.png``.

Why a separate module: the runner decides what was measured; this file only decides how it is
shown, so the table layout can change without touching (or invalidating) any cached result.
The chart is small multiples (one panel per task + the average) because a single grouped bar
chart of ~15 methods × 7 groups is unreadable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLORS = {"pretrained": "#9e9e9e", "experts": "#2e7d32", "expert": "#81c784", "merge": "#1f77b4",
          "tadrop": "#ff7f0e"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _setting(key: str, value: Any) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def selected_text(chosen: dict[str, Any] | None) -> str:
    """A selected candidate in one line: ``tadrop: lambda=1, drop_rate=0.8`` (empty for none)."""
    if not chosen:
        return ""
    parts = [_setting(k, v) for k, v in chosen.get("parameters", {}).items()]
    sp = chosen.get("sparsify") or {}
    parts += [_setting(k, v) for k, v in sp.items() if k != "method"]
    return (f"{sp['method']}: " if sp else "") + ", ".join(parts)


def markdown_table(doc: dict[str, Any]) -> str:
    tasks = doc["tasks"]
    head = ["row", *tasks, "avg", "norm", "merge s", "selected on val"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for r in doc["rows"]:
        secs = r.get("merge_seconds")
        cells = [r["label"], *(_pct(r["test"].get(t)) for t in tasks), _pct(r["average"]),
                 _pct(r["normalized"]), "-" if secs is None else f"{secs:.1f}", selected_text(r.get("selected"))]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t} {n}" for t, n in doc["test_sizes"].items())
    return ("\n".join(lines) + "\n\nTest accuracy in %. avg: mean over tasks; norm: mean over tasks "
            "of accuracy / the task's own expert accuracy, in %. merge s: wall time of the selected "
            f"merge. Test examples: {sizes}.\n")


def bar_chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["kind"] != "expert"]
    panels = [*doc["tasks"], "average"]
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 0.32 * len(rows) * nrows + 1.2),
                             sharey=True, squeeze=False)
    labels = [r["label"] for r in rows]
    own = next(r for r in doc["rows"] if r["kind"] == "experts")
    for ax, panel in zip(axes.flat, panels, strict=False):
        vals = [r["average"] if panel == "average" else r["test"][panel] for r in rows]
        ax.barh(range(len(rows)), vals, color=[COLORS.get(r["kind"], "#555") for r in rows])
        ref = own["average"] if panel == "average" else own["test"][panel]
        ax.axvline(ref, color=COLORS["experts"], ls="--", lw=1)
        lo = max(0.0, min(vals) - 0.05)
        ax.set_xlim(lo, min(1.0, max(vals) + 0.03))
        for i, v in enumerate(vals):
            ax.text(v, i, f" {100 * v:.1f}", va="center", fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(rows)), labels)
    axes[0, 0].invert_yaxis()  # shared y: once for all panels
    model = doc.get("model", "MiniLM encoders")  # the vision run names its backbones
    fig.suptitle(f"{model}, test accuracy with each task's expert head (pretrained + probe: "
                 "probe heads); dashed: the task's own expert", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown_table(doc))
    bar_chart(doc, out / "results.png")
