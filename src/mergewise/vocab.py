"""Tokenizers that differ: one output vocabulary, every model's embedding and head rows aligned
to it by token (mergekit's ``tokenizer_source`` / ``tokenizer:`` block).

- Vocabularies are read from each model's ``tokenizer.json`` (the fast-tokenizer file; its
  ``model.vocab`` and ``added_tokens``), keeping ids below the config's ``vocab_size``.
- ``source: base`` keeps the base's vocabulary (the first model's without a base);
  ``source: union`` keeps the base's tokens at their ids and appends every other token, model
  by model in recipe order and by each model's own id order (deterministic; mergekit's order
  varies from run to run); ``source: <model path>`` takes that model's vocabulary.
  ``pad_to_multiple_of`` rounds the row count up.
- A vocabulary tensor (an embedding or head whose first dimension is that model's vocab size)
  of every input is rebuilt row by row for the output tokens. A model lacking a token gets,
  as in mergekit: the row of the one model that has it; else, when several have it, the base's
  row if the base has it, else their mean; zeros when none has it. ``tokens:`` overrides
  (``source: MODEL`` that model's row, ``{kind: zero}``, ``{kind: model_token, model,
  token_id | token}`` a row of the model's original vocabulary; ``force: true`` for every
  model) take precedence. Padding rows are each model's mean aligned row.
- The output tokenizer is the source's ``tokenizer.json`` with the new tokens appended as added
  tokens (ids after its vocabulary), and the config's ``vocab_size`` is the new row count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError, RecipeError

TOKENIZER_JSON = "tokenizer.json"
_VOCAB_TENSOR = re.compile(r"embed_tokens|word_embeddings|(?:^|\.)wte\.|lm_head|embed_out|"
                           r"(?:^|\.)output\.weight$|(?:^|\.)shared\.weight$")


@dataclass(frozen=True)
class Vocabulary:
    """A model's tokens: token -> id, for ids below its vocab size, and its added tokens'
    entries (flags kept when the token is added to another tokenizer)."""

    label: str
    ids: dict[str, int]
    rows: int  # the model's vocab size (embedding rows)
    added: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_vocabulary(ckpt: Checkpoint) -> Vocabulary:
    """The vocabulary of a checkpoint directory's ``tokenizer.json`` (one line on failure)."""
    directory = ckpt.directory
    path = directory / TOKENIZER_JSON if directory is not None else None
    if path is None or not path.is_file():
        raise CheckpointError(f"{ckpt.label}: has no {TOKENIZER_JSON}; merging models whose "
                              "vocabularies differ needs each model's fast-tokenizer file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable tokenizer file ({exc})") from None
    ids = ({tok: i for i, (tok, *_rest) in enumerate(vocab)} if isinstance(vocab, list)
           else {str(t): int(i) for t, i in vocab.items()})
    added = {e["content"]: e for e in data.get("added_tokens", []) if "content" in e}
    ids.update({tok: int(e["id"]) for tok, e in added.items()})
    rows = (ckpt.config or {}).get("vocab_size")
    rows = rows if isinstance(rows, int) and rows > 0 else max(ids.values(), default=-1) + 1
    return Vocabulary(ckpt.label, {t: i for t, i in ids.items() if i < rows}, rows, added)


@dataclass(frozen=True)
class TokenSource:
    """A ``tokens:`` entry: where a token's row comes from (model index, or None for zeros,
    and the row in that model's original vocabulary), and whether it overrides every model."""

    model: int | None
    row: int | None  # None: the model's row for this very token
    force: bool = False


@dataclass
class Alignment:
    """The output vocabulary and, per input (models then base), the original id of each output
    token (-1 when the input lacks it)."""

    tokens: list[str]
    rows: int  # padded
    perms: list[torch.Tensor]
    base_index: int | None  # which input is the base
    overrides: dict[int, TokenSource]
    source: Vocabulary
    new: list[str]  # tokens added to the source tokenizer
    input_rows: list[int] = field(default_factory=list)  # each input's vocab size
    source_index: int = 0  # the input whose tokenizer the output takes
    vocabs: list[Vocabulary] = field(default_factory=list)

    def is_vocab_tensor(self, name: str, shape: Sequence[int], input_rows: int) -> bool:
        return bool(shape) and shape[0] == input_rows and _VOCAB_TENSOR.search(name) is not None

    def align(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every input's vocabulary tensor rebuilt for the output tokens (one per input)."""
        n = len(self.tokens)
        have = torch.stack([p >= 0 for p in self.perms])  # [inputs, tokens]
        rows = [t[p.clamp(min=0)] for t, p in zip(tensors, self.perms, strict=True)]
        default = self._defaults(rows, have)
        out = []
        for row, mask in zip(rows, have, strict=True):
            aligned = torch.where(mask.reshape(-1, *[1] * (row.dim() - 1)), row, default)
            for tok, src in self.overrides.items():
                if src.force or not bool(mask[tok]):
                    aligned[tok] = self._override(src, tensors, tok, default)
            out.append(_pad(aligned, self.rows - n))
        return out

    def _defaults(self, rows: list[torch.Tensor], have: torch.Tensor) -> torch.Tensor:
        """mergekit's row for a model lacking a token: the single owner's, else the base's if
        it has it, else the owners' mean; zeros when nobody has it."""
        count = have.sum(0)
        stacked = torch.stack(rows)
        mask = have.reshape(*have.shape, *[1] * (stacked.dim() - 2)).to(stacked.dtype)
        mean = (stacked * mask).sum(0) / count.clamp(min=1).reshape(-1, *[1] * (stacked.dim() - 2))
        if self.base_index is not None:
            base_has = have[self.base_index].reshape(-1, *[1] * (stacked.dim() - 2))
            several = torch.where(base_has, stacked[self.base_index], mean)
        else:
            several = mean
        one = (count == 1).reshape(-1, *[1] * (stacked.dim() - 2))
        return torch.where(one, mean, several)  # with one owner the mean is its row

    def _override(self, src: TokenSource, tensors: Sequence[torch.Tensor], tok: int,
                  default: torch.Tensor) -> torch.Tensor:
        if src.model is None:
            return torch.zeros_like(default[tok])
        row = src.row if src.row is not None else int(self.perms[src.model][tok])
        if row < 0:
            raise RecipeError(f"tokenizer.tokens.{self.tokens[tok]}: the source model lacks "
                              "this token; give token_id or token")
        return tensors[src.model][row]


def _pad(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Padding rows (pad_to_multiple_of) are the mean of the aligned rows, as mergekit."""
    if extra <= 0:
        return t
    return torch.cat([t, t.mean(0, keepdim=True).expand(extra, *t.shape[1:])])


def output_tokens(vocabs: Sequence[Vocabulary], source: str | int, base: int) -> list[str]:
    """The output tokens in id order: ``source`` is 'base', 'union' or an input index."""
    first = vocabs[source if isinstance(source, int) else base]
    by_id = sorted(first.ids.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise CheckpointError(f"{first.label}: its token ids below vocab_size are not 0..n-1 "
                              "without gaps; cannot build a vocabulary from it")
    tokens = [t for t, _ in by_id]
    if source == "union":
        seen = set(tokens)
        for v in vocabs:
            for tok, _ in sorted(v.ids.items(), key=lambda kv: kv[1]):
                if tok not in seen:
                    seen.add(tok)
                    tokens.append(tok)
    return tokens


def build_alignment(vocabs: Sequence[Vocabulary], source: str | int, base: int | None,
                    pad_to: int | None = None,
                    overrides: Mapping[str, TokenSource] | None = None) -> Alignment:
    tokens = output_tokens(vocabs, source, base if base is not None else 0)
    index = {t: i for i, t in enumerate(tokens)}
    perms = [torch.tensor([v.ids.get(t, -1) for t in tokens], dtype=torch.long) for v in vocabs]
    rows = len(tokens) if not pad_to else -(-len(tokens) // pad_to) * pad_to
    src = vocabs[source if isinstance(source, int) else (base if base is not None else 0)]
    resolved: dict[int, TokenSource] = {}
    for tok, spec in (overrides or {}).items():
        if tok not in index:
            tokens.append(tok)  # a configured token the vocabularies lack is added
            index[tok] = len(tokens) - 1
            perms = [torch.cat([p, torch.tensor([-1])]) for p in perms]
            rows = max(rows, len(tokens))
        resolved[index[tok]] = spec
    new = [t for t in tokens if t not in src.ids]
    index_of_src = source if isinstance(source, int) else (base if base is not None else 0)
    return Alignment(tokens, rows, perms, base, resolved, src, new, [v.rows for v in vocabs],
                     index_of_src, list(vocabs))


def tokenizer_text(alignment: Alignment, source_dir: Path,
                   vocabs: Sequence[Vocabulary] = ()) -> str:
    """The source's tokenizer.json with the new tokens appended as added tokens (with the
    flags a model gave the token as one of its own added tokens, else plain ones)."""
    data = json.loads((source_dir / TOKENIZER_JSON).read_text(encoding="utf-8"))
    added = data.setdefault("added_tokens", [])
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
             "special": False}
    start = len(alignment.source.ids)
    for i, tok in enumerate(alignment.new):
        flags = next(({k: v for k, v in v.added[tok].items() if k not in ("id", "content")}
                      for v in vocabs if tok in v.added), plain)
        added.append({"id": start + i, "content": tok, **flags})
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _vocab_or_none(ckpt: Checkpoint) -> Vocabulary | None:
    try:
        return read_vocabulary(ckpt)
    except CheckpointError:
        return None


def _input_of(path: Path | None, inputs: Sequence[Checkpoint], what: str) -> int:
    for i, c in enumerate(inputs):
        if path is not None and c.directory is not None and c.directory.resolve() == path.resolve():
            return i
    raise RecipeError(f"{what}: '{path}' is not one of the merge's models or its base; the "
                      "tokenizer source must be a merge input")


def alignment_for(block: Any, inputs: Sequence[Checkpoint], base: int | None,
                  resolve: Any) -> Alignment | None:
    """The vocabulary alignment a recipe's tokenizer settings ask for over ``inputs`` (models
    then base), or None when there is nothing to align: every input has the same vocab size and
    not all of them carry a tokenizer.json (mergekit: 'assumed same as base').
    ``resolve(text, key)`` resolves a model path of the recipe."""
    vocabs = [_vocab_or_none(c) for c in inputs]
    rows = {v.rows if v else (c.config or {}).get("vocab_size") for v, c in zip(vocabs, inputs,
                                                                                strict=True)}
    if any(v is None for v in vocabs):
        if len(rows) == 1 and not block.tokens and not block.pad_to_multiple_of:
            return None
        lacking = next(c.label for v, c in zip(vocabs, inputs, strict=True) if v is None)
        raise CheckpointError(f"{lacking}: has no {TOKENIZER_JSON}; aligning vocabularies "
                              "(tokenizer_source / tokenizer:) needs every model's fast-"
                              "tokenizer file")
    source: str | int = block.source
    if source not in ("union", "base"):
        source = _input_of(resolve(block.source, "tokenizer.source"), inputs, "tokenizer.source")
    overrides = {tok: _token_source(tok, spec, inputs, vocabs, resolve)
                 for tok, spec in (block.tokens or {}).items()}
    return build_alignment(vocabs, source, base, block.pad_to_multiple_of,  # type: ignore[arg-type]
                           overrides)


def _token_source(tok: str, spec: Any, inputs: Sequence[Checkpoint],
                  vocabs: Sequence[Vocabulary | None], resolve: Any) -> TokenSource:
    where = f"tokenizer.tokens.{tok}"
    src = spec.source
    if isinstance(src, str):
        return TokenSource(_input_of(resolve(src, where), inputs, where), None, spec.force)
    if src.kind == "zero":
        return TokenSource(None, None, spec.force)
    k = _input_of(resolve(src.model, where), inputs, where)
    vocab = vocabs[k]
    assert vocab is not None
    row = src.token_id if src.token_id is not None else vocab.ids.get(src.token)
    if row is None or row >= vocab.rows:
        raise RecipeError(f"{where}: {inputs[k].label} has no token "
                          f"{src.token if src.token is not None else src.token_id!r}")
    return TokenSource(k, row, spec.force)
