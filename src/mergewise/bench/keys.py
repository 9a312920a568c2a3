"""The one hash behind every benchmark cache key (experts, probes, cached evaluations).

Changing it, or the JSON it hashes, changes every key: each cached expert and evaluation would
be rebuilt. Keep the string byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def key_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON (``str`` for the rest)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
