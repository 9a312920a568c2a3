"""The benchmark's cache keys are pinned: a changed hash would orphan every cached expert and
evaluation (they are looked up by these strings)."""

from __future__ import annotations

from pathlib import Path

from mergewise.bench.keys import key_hash


def test_key_hash_is_pinned():
    # sorted keys, str() for what JSON cannot hold (a Path), 16 hex digits of SHA-256
    assert key_hash({"kind": "expert", "b": [1, 2.5], "a": Path("x/y")}) == "d97abf352cb4d462"
    assert key_hash({"a": Path("x/y"), "b": [1, 2.5], "kind": "expert"}) == "d97abf352cb4d462"
    assert key_hash([]) == "4f53cda18c2baa0c"


def test_zoo_and_runner_share_the_one_hash():
    from mergewise.bench import results_cache, runner, vision_zoo, zoo

    assert not hasattr(zoo, "_hash") and not hasattr(runner, "_hash")
    assert zoo.key_hash is results_cache.key_hash is vision_zoo.key_hash is key_hash
