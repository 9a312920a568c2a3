"""The runner's per-evaluation result cache: one JSON file per evaluation under ``OUT/cache``.

Why its own module: the text and the vision zoo runs (and the studies) share it, and the key
is everything an evaluation depends on (the run context + its merge spec), so an interrupted
run resumes where it stopped and a re-run is instant, whichever zoo it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .keys import key_hash


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:40]


class ResultCache:
    """One JSON file per evaluation under ``OUT/cache``: resume and instant re-runs."""

    def __init__(self, root: Path, context: dict[str, Any]):
        self.root = root / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
        self.context = context

    def path(self, label: str, spec: dict[str, Any]) -> Path:
        return self.root / f"{_slug(label)}-{key_hash({**self.context, **spec})}.json"

    def get(self, label: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        p = self.path(label, spec)
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, label: str, spec: dict[str, Any], result: dict[str, Any]) -> None:
        p = self.path(label, spec)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(p)
