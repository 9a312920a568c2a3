"""Per-tensor report tables, per-module-kind summaries and diagnostic plots (PNG).

Module kinds and layer depth are inferred from tensor names (Llama, BERT, GPT-2, T5, ViT and
CLIP naming), so the report needs no architecture definition.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .layers import layer_index

_KIND_RULES: list[tuple[str, re.Pattern[str]]] = [
    # first: a norm inside the embeddings (BERT's embeddings.LayerNorm) is a norm
    ("norm", re.compile(r"(norm|ln_|\.ln\d|layernorm|layer_norm|LayerNorm)", re.IGNORECASE)),
    ("embedding", re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|"
                             r"token_type_embeddings|shared\.weight|patch_embed|class_embedding|"
                             r"positional_embedding)")),
    ("head", re.compile(r"(lm_head|classifier|score\.|pooler|head\.)")),
    ("attn_q", re.compile(r"(q_proj|\.query\.|\.q\.|q_lin|wq\b)")),
    ("attn_k", re.compile(r"(k_proj|\.key\.|\.k\.|k_lin|wk\b)")),
    ("attn_v", re.compile(r"(v_proj|\.value\.|\.v\.|v_lin|wv\b)")),
    ("attn_qkv", re.compile(r"(qkv|c_attn|in_proj|query_key_value|Wqkv)")),
    ("attn_o", re.compile(r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|\.o\.|"
                          r"out_lin|dense\b.*attention|self_attn\.dense)")),
    ("mlp_gate", re.compile(r"(gate_proj|w1\b|\.wi_0\.)")),
    ("mlp_up", re.compile(r"(up_proj|fc1|c_fc|intermediate\.dense|\.wi\.|\.wi_1\.|lin1|w3\b)")),
    ("mlp_down", re.compile(r"(down_proj|fc2|mlp\.c_proj|\.output\.dense|\.wo\.|lin2|w2\b)")),
]


def module_kind(name: str) -> str:
    """attn_q/k/v/qkv/o, mlp_gate/up/down, norm, embedding, head, bias or other."""
    for kind, pattern in _KIND_RULES:
        if pattern.search(name):
            if name.endswith(".bias") and kind not in ("norm",):
                return "bias"
            return kind
    return "bias" if name.endswith(".bias") else "other"


ROW_FIELDS = ["task", "tensor", "kind", "layer", "numel", "d", "drop_rate", "kept",
              "kept_fraction", "norm_before", "norm_after", "rescale"]


def tensor_rows(records: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (task, merged tensor) from the engine's per-tensor records."""
    rows = []
    for rec in records:
        for task, info in zip(tasks, rec.get("models") or [], strict=False):
            numel = rec["numel"]
            rows.append({
                "task": task, "tensor": rec["name"], "kind": module_kind(rec["name"]),
                "layer": layer_index(rec["name"]), "numel": numel,
                "d": info.get("d"), "drop_rate": info.get("drop_rate"),
                "kept": info.get("kept"),
                "kept_fraction": (info["kept"] / numel) if numel and "kept" in info else None,
                "norm_before": info.get("norm_before"), "norm_after": info.get("norm_after"),
                "rescale": info.get("rescale"),
            })
    return rows


def kind_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and module kind: tensors, elements, mean d, realised drop rate, mean rescale."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["kind"])].append(r)
    out = []
    for (task, kind), rs in sorted(groups.items()):
        ds = [r["d"] for r in rs if r["d"] is not None]
        scales = [r["rescale"] for r in rs if r["rescale"] is not None]
        out.append({
            "task": task, "kind": kind, "tensors": len(rs), "numel": sum(r["numel"] for r in rs),
            "mean_d": sum(ds) / len(ds) if ds else None,
            "realised_drop_rate": realised_drop_rate(rs),
            "mean_rescale": sum(scales) / len(scales) if scales else None,
        })
    return out


def realised_drop_rate(rows: Sequence[dict[str, Any]]) -> float | None:
    """1 - kept / elements over the rows whose kept count is known (a merge's rows; ``inspect``
    decides rates without dropping, so its rows have none), None when no row has one."""
    known = [r for r in rows if r["kept"] is not None]
    numel = sum(r["numel"] for r in known)
    return 1.0 - sum(r["kept"] for r in known) / numel if numel else None


def task_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: element-weighted realised drop rate over all merged tensors."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return [{"task": task, "numel": sum(r["numel"] for r in rs),
             "realised_drop_rate": realised_drop_rate(rs)} for task, rs in by_task.items()]


def write_tables(directory: Path, report: dict[str, Any], rows: Sequence[dict[str, Any]],
                 stem: str = "report") -> None:
    """``{stem}.json`` (report + rows + summaries) and ``{stem}.csv`` (one row per task x tensor)."""
    report = {**report, "rows": list(rows), "by_kind": kind_summary(rows),
              "by_task": task_summary(rows)}
    (directory / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    with open(directory / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in ROW_FIELDS})


# --- plots -------------------------------------------------------------------------------------

KIND_COLOURS = {
    "attn_q": "#1f77b4", "attn_k": "#aec7e8", "attn_v": "#17becf", "attn_qkv": "#9edae5",
    "attn_o": "#393b79", "mlp_gate": "#d62728", "mlp_up": "#ff7f0e", "mlp_down": "#8c564b",
    "norm": "#2ca02c", "embedding": "#9467bd", "head": "#e377c2", "bias": "#7f7f7f",
    "other": "#bcbd22",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(samples: Sequence[tuple[str, str, float, Any]], path: Path) -> None:
    """|tau| histograms (log counts) for the tensors with the lowest and highest d.

    ``samples``: (label 'lowest d'/'highest d', tensor name, d, 1-D numpy array of |tau|).
    """
    plt = _pyplot()
    import numpy as np

    n = len(samples)
    cols = min(3, max(1, n // 2 if n > 3 else n))
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.4 * rows_), squeeze=False)
    for ax, (label, name, d, values) in zip(axes.flat, samples, strict=False):
        q95 = float(np.quantile(values, 0.95)) if values.size else 0.0
        top = float(values.max()) if values.size else 1.0
        ax.hist(values, bins=80, range=(0.0, top if top > 0 else 1.0),
                color="#d62728" if label == "highest d" else "#1f77b4")
        ax.set_yscale("log")
        if q95 > 0:
            ax.axvline(q95, color="k", ls="--", lw=1, label="Q0.95")
            ax.axvline(float(np.quantile(values, 0.5)), color="k", ls=":", lw=1, label="Q0.50")
            ax.legend(fontsize=7)
        short = name if len(name) <= 42 else "…" + name[-41:]
        ax.set_title(f"{label}: d = {d:.3f}\n{short}", fontsize=8)
        ax.set_xlabel("|τ| (task-vector magnitude)", fontsize=8)
        ax.set_ylabel("count (log)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle("Task-vector magnitude histograms: flattest (highest d) vs heaviest-tailed "
                 "(lowest d) tensors", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_d_by_layer(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """d per layer depth, coloured by module kind; one panel per task."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False,
                             sharey=True)
    layers = [r["layer"] for r in rows if r["layer"] is not None]
    last = (max(layers) + 1) if layers else 0
    for ax, task in zip(axes.flat, tasks, strict=False):
        seen = set()
        for r in rows:
            if r["task"] != task or r["d"] is None:
                continue
            x = r["layer"] if r["layer"] is not None else (-1 if r["kind"] == "embedding" else last)
            kind = r["kind"]
            ax.scatter(x, r["d"], s=18, color=KIND_COLOURS.get(kind, "#000"), alpha=0.8,
                       label=None if kind in seen else kind)
            seen.add(kind)
        ax.set_title(f"task: {task}", fontsize=9)
        ax.set_xlabel("layer depth (-1 = embeddings, last = final norm / head)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("d = Q0.50(|τ|) / Q0.95(|τ|)", fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=False):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.suptitle("Quantile ratio d per tensor: low = heavy-tailed (kept), high = flat (pruned)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=max(1, len(labels)),
               title="module kind", title_fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drop_vs_d(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """TADrop's drop rate against d, coloured by module kind; all tasks together."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    for r in rows:
        if r["d"] is None or r["drop_rate"] is None:
            continue
        kind = r["kind"]
        ax.scatter(r["d"], r["drop_rate"], s=16, alpha=0.75, color=KIND_COLOURS.get(kind, "#000"),
                   label=None if kind in seen else kind)
        seen.add(kind)
    ax.set_xlabel("d = Q0.50(|τ|) / Q0.95(|τ|)")
    ax.set_ylabel("assigned drop rate p")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="module kind", loc="lower right")
    ax.set_title("TADrop: drop rate vs quantile ratio (each point = one tensor of one task)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
