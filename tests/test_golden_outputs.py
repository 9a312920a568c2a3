"""Golden outputs: the sha256 of every file a set of recipes writes, one recipe per method and
option family, checked against hashes recorded in ``golden_outputs.json``.

This is the guard of behaviour-preserving work (restructures, speed-ups): merged bytes must not
move. A change that is meant to change merged values regenerates the file deliberately with
``MERGEWISE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_outputs.py`` and says why in its
commit message. Report files (timings, versions) are not hashed; weights, modulators, index,
config and recipe copies are.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import SMALL, make_family, write_recipe

from mergewise import materialize, merge, merge_state_dicts
from mergewise.features import capture

GOLDEN = Path(__file__).with_name("golden_outputs.json")
HASHED = (".safetensors", ".json", ".yaml")
SKIPPED = {"report.json"}


def _rel(path: Path) -> str:
    """Paths relative to the recipes' directory: the recipe copies in the outputs are stable."""
    return f"fam/{path.name}"


def _ta(fam: Any, method: str, **extra: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": _rel(fam.base),
            "models": [{"model": _rel(e), "name": f"t{i}"} for i, e in enumerate(fam.experts)],
            **extra}


def recipes(fam: Any) -> dict[str, dict[str, Any]]:
    w = [{"model": _rel(e), "name": f"t{i}", "parameters": {"weight": [0.5, 1.5, 1.0][i]}}
         for i, e in enumerate(fam.experts)]
    two = [{"model": _rel(e)} for e in fam.experts[:2]]
    return {
        "linear_weights": {"merge_method": "linear", "models": w},
        "linear_sum_f32out": {"merge_method": "linear", "models": w,
                              "parameters": {"normalize": False}, "out_dtype": "float32"},
        "task_arithmetic": {**_ta(fam, "task_arithmetic"), "models": w,
                            "parameters": {"lambda": 0.7}},
        "task_arithmetic_trim_norm": _ta(fam, "task_arithmetic", parameters={
            "density": 0.4, "normalize": True}),
        "ties_filters": _ta(fam, "ties", parameters={
            "density": [{"glob": "*mlp*", "value": 0.3}, {"value": 0.2}], "lambda": 1.2}),
        "ties_global_weighted": {**_ta(fam, "ties"), "models": w, "parameters": {
            "density": 0.3, "scope": "global", "aggregate": "weighted_mean"}},
        "ties_sum_bf16": _ta(fam, "ties", parameters={"aggregate": "sum"}, dtype="bfloat16"),
        "dare_linear": _ta(fam, "dare_linear", parameters={"density": 0.3}, seed=3),
        "dare_ties": {**_ta(fam, "dare_ties"), "models": w, "parameters": {"density": 0.5}},
        "breadcrumbs": _ta(fam, "breadcrumbs", parameters={"density": 0.8, "gamma": 0.05}),
        "breadcrumbs_ties": _ta(fam, "breadcrumbs_ties"),
        "slerp_filters": {"merge_method": "slerp", "models": two, "parameters": {
            "t": [{"glob": "*self_attn*", "value": 0.2}, {"glob": "*mlp*", "value": 0.9},
                  {"value": 0.5}]}},
        "slerp_base_first": {"merge_method": "slerp", "base_model": _rel(fam.base),
                             "models": two[:1], "parameters": {"t": 0.3}},
        "ties_tadrop": _ta(fam, "ties", sparsify={"method": "tadrop", "drop_rate": 0.7}),
        "ta_tadrop_elements_random": _ta(fam, "task_arithmetic", sparsify={
            "method": "tadrop", "drop_rate": 0.6, "budget": "elements", "mode": "random",
            "skip": ["*embed*"]}, seed=5),
        "dare_ties_tadrop": _ta(fam, "dare_ties", sparsify={"method": "tadrop",
                                                             "drop_rate": 0.5, "strength": 2.0}),
        "ties_per_model_sparsify": {**_ta(fam, "ties"), "models": [
            {"model": _rel(fam.experts[0]), "sparsify": {"method": "tadrop", "drop_rate": 0.5}},
            {"model": _rel(fam.experts[1]), "sparsify": {"method": "magnitude", "density": 0.4}},
            {"model": _rel(fam.experts[2])}]},
        "emr": _ta(fam, "emr"),
        "emr_tadrop": _ta(fam, "emr", sparsify={"method": "tadrop", "drop_rate": 0.8}),
    }


def _file_hash(path: Path) -> str:
    """sha256 of the file; for safetensors, without the header's machine-specific paths and
    the recipe copy."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.get("__metadata__", {}).pop("base_model", None)
        # the recipe text is hashed through mergewise_recipe.yaml: the weights' hash must not
        # move when only the recipe's spelling does
        header.get("__metadata__", {}).pop("mergewise_recipe", None)
        raw = json.dumps(header, sort_keys=True).encode() + raw[8 + n:]
    return hashlib.sha256(raw).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _file_hash(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in HASHED and p.name not in SKIPPED}


def state_hash(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].contiguous()
        h.update(f"{name}{list(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _lot_hashes(fam: Any) -> dict[str, str]:
    """LOT / RegMean in memory, features captured from the real transformers Llama."""
    transformers = pytest.importorskip("transformers")
    from mergewise.checkpoint import open_checkpoint

    sds = []
    for path in [fam.base, *fam.experts]:
        with open_checkpoint(path) as c:
            sds.append({n: c.read(n).clone() for n in c.names()})
    base, experts = sds[0], sds[1:]
    cfg = transformers.AutoConfig.from_pretrained(str(fam.base))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    stats = []
    for k, sd in enumerate(experts):
        model.load_state_dict({n: v.float() for n, v in sd.items()}, strict=True)
        g = torch.Generator().manual_seed(k)
        batches = [{"input_ids": torch.randint(0, SMALL.vocab, (2, 6), generator=g),
                    "attention_mask": torch.ones(2, 6, dtype=torch.long)} for _ in range(3)]
        stats.append(capture(model, batches, label=f"t{k}"))
    out = {}
    for key, method, extra in [("lot", "lot", {}), ("lot_equal", "lot", {"tasks": "equal"}),
                               ("regmean", "regmean", {"alpha": 0.9})]:
        merged = merge_state_dicts(base if method == "lot" else None, experts, method,
                                   parameters=extra, features=stats)
        out[key] = state_hash(merged)
    merged = merge_state_dicts(base, experts, "lot", features=stats,
                               sparsify={"method": "tadrop", "drop_rate": 0.6})
    out["lot_tadrop"] = state_hash(merged)
    return out


def compute(tmp: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    fam = make_family(tmp / "fam", shape=SMALL, n_experts=3, dtype=torch.bfloat16)
    result: dict[str, Any] = {}
    for name, data in recipes(fam).items():
        path = write_recipe(tmp / f"{name}.yaml", data)
        out = tmp / "out" / name
        merge(path, out, shard_size="40KB" if name == "ties_filters" else "5GB")
        result[name] = file_hashes(out)
    task = tmp / "out" / "emr_task_t1"
    materialize(tmp / "out" / "emr", "t1", task)
    result["emr_materialize_t1"] = file_hashes(task)
    result["memory"] = _lot_hashes(fam)
    return result


def test_outputs_match_golden_hashes(tmp_path: Path) -> None:
    got = compute(tmp_path)
    if os.environ.get("MERGEWISE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    moved = [f"{recipe}/{f}" for recipe in want for f in set(want[recipe]) | set(got[recipe])
             if want[recipe].get(f) != got[recipe].get(f)]
    assert not moved, f"outputs changed: {moved}"
