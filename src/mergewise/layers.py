"""Layers from tensor names: which block a tensor belongs to, how deep that is, and renaming a
tensor into another block (frankenmerges). Architecture-free: Hugging Face names number their
blocks ``layers.N.`` (Llama, Mistral, Qwen...), ``layer.N.`` (BERT), ``h.N.`` (GPT-2),
``blocks.N.`` / ``block.N.`` / ``resblocks.N.`` (ViT, CLIP, T5)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")
_BEFORE_BLOCKS = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.", re.IGNORECASE)
# config keys holding the number of blocks (the first present is used)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_index(name: str) -> int | None:
    """The block a tensor belongs to (the first block number in its name), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, index: int) -> str:
    """``name`` moved to block ``index`` (``model.layers.3.x`` -> ``model.layers.7.x``)."""
    m = _LAYER.search(name)
    if m is None:
        return name
    return name[:m.start(1)] + str(index) + name[m.end(1):]


def layer_count(config: Mapping[str, Any] | None, names: Iterable[str]) -> int:
    """The number of blocks: the config's count, else one more than the highest block number."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def position(offset: int | None, count: int) -> float:
    """Where a tensor sits for gradients (mergekit's t): block ``offset`` of ``count`` is at
    offset / (count - 1), a one-block stack at 1, anything outside the blocks (embeddings,
    final norm, head) at 0."""
    if offset is None:
        return 0.0
    return 1.0 if count <= 1 else offset / (count - 1)


def before_blocks(name: str) -> bool:
    """Whether a tensor outside the blocks comes before them (embeddings) rather than after
    (final norm, head): a frankenmerge takes the first from its first slice, the others from
    its last."""
    return layer_index(name) is None and _BEFORE_BLOCKS.search(name) is not None


def restack_config(config: dict[str, Any], source_layers: list[int]) -> dict[str, Any]:
    """The config of a model whose block i is the reference's block ``source_layers[i]``: the
    block count updated, and per-block lists (``layer_types``...) taken along (mergekit
    updates only the count)."""
    old = layer_count(config, ())
    out = dict(config)
    for key in LAYER_COUNT_KEYS:
        if key in out:
            out[key] = len(source_layers)
    for key, value in config.items():
        if isinstance(value, list) and old and len(value) == old and key not in LAYER_COUNT_KEYS:
            out[key] = [value[i] for i in source_layers]
    return out
