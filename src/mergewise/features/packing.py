"""Packing short calibration texts into full ``max_length`` rows (causal LMs).

Padded batches of short texts spend most of their positions on padding, which the capture masks
out: 64 chat turns of 20 tokens give 1,280 rows from a forward pass over 64 × the longest. With
``pack: true`` the drawn texts are tokenized without truncation or padding, each followed by
the tokenizer's end-of-sequence token (unless it already ends with it), concatenated in draw
order and cut into rows of exactly ``max_length`` tokens; only the last row is shorter, padded
and masked. Every token of every drawn text is then a calibration row (none is truncated away).
Attention crosses the text boundaries inside a row (no block-diagonal mask), as in the usual
pre-training packing: a token may attend to the end of the previous text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import FeatureError


def token_lists(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids, untruncated, unpadded, with the tokenizer's special tokens."""
    enc = tokenizer(list(texts), truncation=False, padding=False)
    ids = enc["input_ids"] if "input_ids" in enc else None
    if not isinstance(ids, list) or len(ids) != len(texts):
        raise FeatureError("pack: the tokenizer did not return one list of input_ids per text")
    return [[int(t) for t in row] for row in ids]


def packed_rows(ids: Sequence[Sequence[int]], origins: Sequence[int], max_length: int,
                eos: int | None, pad: int) -> tuple[list[list[int]], list[int], int]:
    """The texts' ids (each ended by ``eos`` unless it already is) concatenated and cut into
    rows of ``max_length`` (the last padded with ``pad``); per row, the index of the example
    its first token comes from; and the number of real tokens."""
    stream: list[int] = []
    owner: list[int] = []
    for row, origin in zip(ids, origins, strict=True):
        tokens = list(row) + ([eos] if eos is not None and (not row or row[-1] != eos) else [])
        stream += tokens
        owner += [origin] * len(tokens)
    if not stream:
        raise FeatureError("pack: the calibration texts hold no tokens")
    rows = [stream[s:s + max_length] for s in range(0, len(stream), max_length)]
    firsts = [owner[s] for s in range(0, len(stream), max_length)]
    rows[-1] = rows[-1] + [pad] * (max_length - len(rows[-1]))
    return rows, firsts, len(stream)


def packed_batches(tokenizer: Any, texts: Sequence[str], drawn: Sequence[int], *,
                   max_length: int, batch_size: int
                   ) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
    """Batches of packed rows (``input_ids``, ``attention_mask``) and each row's origin."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else eos if isinstance(eos, int) else 0
    rows, firsts, total = packed_rows(token_lists(tokenizer, texts), drawn, max_length,
                                      eos if isinstance(eos, int) else None, pad)
    mask = torch.ones(len(rows), max_length, dtype=torch.long)
    mask[-1, total - (len(rows) - 1) * max_length:] = 0
    input_ids = torch.tensor(rows, dtype=torch.long)
    batches = [{"input_ids": input_ids[s:s + batch_size], "attention_mask": mask[s:s + batch_size]}
               for s in range(0, len(rows), batch_size)]
    return batches, [firsts[s:s + batch_size] for s in range(0, len(rows), batch_size)]
