"""Calibration data and experts as torch modules, for the feature capture.

- The seeded draw of examples (``draw_examples``, also used by the benchmark), text (.txt,
  .jsonl) and tensor (.pt, .pth, .safetensors, .npy) readers, and ``calibration_batches``: the
  draw cut into batches of model inputs (texts tokenized).
- ``calibration_settings``: what the statistics depend on besides the model, the data identified
  by content hash (recorded in the stats file, compared when it is reused).
- ``load_module``: an expert as a float32 module, from a ``module:function`` factory or a Hugging
  Face directory through transformers, which is optional (a one-line error without it).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..checkpoint import open_checkpoint
from ..errors import FeatureError, first_line
from ..lora import LoraCheckpoint, is_adapter_dir
from .packing import packed_batches

Batch = Mapping[str, torch.Tensor] | torch.Tensor
# What text calibration data is tokenized with: a transformers tokenizer, called as
# ``tokenizer(texts, truncation=True, max_length=n, padding=True, return_tensors="pt")`` and
# returning a BatchEncoding (a mapping of tensors). transformers is optional and imported only at
# run time, so its tokenizer classes cannot be named here; any callable of that shape will do.
Tokenizer = Callable[..., Mapping[str, torch.Tensor]]

TEXT_SUFFIXES = (".txt", ".jsonl")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


def draw_examples(n: int, num_examples: int, seed: int) -> list[int]:
    """``num_examples`` distinct indices out of ``n`` (all of them when n is smaller), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(n, num_examples)].tolist()


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """One example per non-empty line (.txt) or the ``text_field`` of each JSON line (.jsonl)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatureError(f"{path}: cannot read calibration texts ({exc})") from None
    if path.suffix == ".txt":
        texts = [ln for ln in lines if ln.strip()]
    else:
        texts = []
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise FeatureError(f"{path}: line {i} is not JSON ({exc.msg})") from None
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise FeatureError(f"{path}: line {i} has no string field '{text_field}' "
                                   "(set calibration.text_field)")
            texts.append(value)
    if not texts:
        raise FeatureError(f"{path}: holds no calibration examples")
    return texts


def read_tensor_inputs(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """A tensor of model inputs (first dim = examples), or a dict of them (``input_ids``...)."""
    try:
        if path.suffix == ".npy":
            import numpy as np

            obj: object = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader has its own error types
        raise FeatureError(f"{path}: cannot read calibration inputs ({first_line(exc)})") from None
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if isinstance(obj, torch.Tensor) and obj.dim() >= 1:
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sizes = {v.shape[0] for v in obj.values()}
        if len(sizes) == 1:
            return dict(obj)
    raise FeatureError(f"{path}: calibration inputs must be a tensor or a dict of tensors with "
                       "one first dimension (examples)")


def calibration_batches(path: Path, *, num_examples: int = 64, batch_size: int = 8,
                        max_length: int = 128, seed: int = 0, tokenizer: Tokenizer | None = None,
                        text_field: str = "text", pack: bool = False) -> list[Batch]:
    """The seeded draw of ``num_examples`` examples, cut into batches of model inputs."""
    return calibration_draw(path, num_examples=num_examples, batch_size=batch_size,
                            max_length=max_length, seed=seed, tokenizer=tokenizer,
                            text_field=text_field, pack=pack)[0]


def calibration_draw(path: Path, *, num_examples: int = 64, batch_size: int = 8,
                     max_length: int = 128, seed: int = 0, tokenizer: Tokenizer | None = None,
                     text_field: str = "text", pack: bool = False
                     ) -> tuple[list[Batch], list[list[int]]]:
    """``calibration_batches`` and, per batch, the index of each row's example in the data
    file (so a bad example can be named). ``pack``: texts packed into full ``max_length``
    rows (``packing``) instead of one padded, truncated row each."""
    if num_examples < 1:
        raise FeatureError(f"{path}: num_examples is {num_examples}; a capture needs at least one "
                           "calibration example")
    if path.suffix in TEXT_SUFFIXES:
        texts = read_texts(path, text_field)
        drawn = draw_examples(len(texts), num_examples, seed)
        picked = [texts[i] for i in drawn]
        if tokenizer is None:
            raise FeatureError(f"{path}: text calibration data needs a tokenizer (the base "
                               "model directory, or tokenizer_source, must hold one)")
        _pad_with_eos(tokenizer)
        if pack:
            return packed_batches(tokenizer, picked, drawn, max_length=max_length,  # type: ignore[return-value]
                                  batch_size=batch_size)
        return ([dict(tokenizer(picked[s:s + batch_size], truncation=True, max_length=max_length,
                                padding=True, return_tensors="pt"))
                 for s in range(0, len(picked), batch_size)],
                [drawn[s:s + batch_size] for s in range(0, len(drawn), batch_size)])
    if path.suffix in TENSOR_SUFFIXES:
        if pack:
            raise FeatureError(f"{path}: pack: true packs texts; tensor calibration data is "
                               "already in rows (drop pack)")
        data = read_tensor_inputs(path)
        n = data.shape[0] if isinstance(data, torch.Tensor) else next(iter(data.values())).shape[0]
        if n == 0:
            raise FeatureError(f"{path}: holds no calibration examples (its inputs have 0 rows)")
        idx = torch.tensor(draw_examples(n, num_examples, seed), dtype=torch.long)
        out: list[Batch] = []
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            out.append(data[part] if isinstance(data, torch.Tensor)
                       else {k: v[part] for k, v in data.items()})
        return out, [idx[s:s + batch_size].tolist() for s in range(0, len(idx), batch_size)]
    raise FeatureError(f"{path}: unknown calibration data format; use "
                       f"{', '.join(TEXT_SUFFIXES + TENSOR_SUFFIXES)}")


def _pad_with_eos(tokenizer: Tokenizer) -> None:
    """A causal LM's tokenizer often has no pad token (Llama, SmolLM2): pad with its
    end-of-sequence token, as is usual; padded positions are masked out of every statistic."""
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]


# --- token ids the model can embed -----------------------------------------------------------

def token_vocabulary(module: nn.Module) -> int | None:
    """How many token ids ``module`` embeds: its Hugging Face input embeddings, else its first
    ``nn.Embedding``; None when it has none (its inputs are features, not token ids)."""
    emb: object = None
    get = getattr(module, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def check_token_ids(batches: list[Batch], origins: list[list[int]], vocab: int | None,
                    path: Path, model: str) -> None:
    """Refuse, before any forward pass, token ids the model cannot embed (floats, negative, at
    or above its vocabulary), naming the first bad example by its index in ``path``. A tensor
    batch holds token ids when the model has an embedding; a dict batch its ``input_ids``."""
    first: tuple[int, str] | None = None
    for batch, rows in zip(batches, origins, strict=True):
        ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or (vocab is None and isinstance(batch, torch.Tensor)):
            continue
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise FeatureError(f"{path}: token ids are {str(ids.dtype).removeprefix('torch.')} "
                               f"(example {min(rows)} and every other), not integers; store "
                               "input_ids as int64")
        bad = ids < 0 if vocab is None else (ids < 0) | (ids >= vocab)
        for r in bad.reshape(len(rows), -1).any(1).nonzero().flatten().tolist():
            value = int(ids[r][bad[r]].flatten()[0])
            if first is None or rows[r] < first[0]:
                first = (rows[r], f"token id {value}")
    if first is not None:
        where = f"0..{vocab - 1}" if vocab is not None else ">= 0"
        raise FeatureError(f"{path}: example {first[0]} has {first[1]}, outside the vocabulary of "
                           f"{model} ({where}); fix the calibration data or its tokenizer")


# --- loading an expert as a module ----------------------------------------------------------

def load_factory(spec: str, root: Path | None = None) -> Callable[[], nn.Module]:
    """Import ``package.module:function`` (the recipe's directory is searched first)."""
    mod_name, _, func_name = spec.partition(":")
    if not mod_name or not func_name:
        raise FeatureError(f"factory '{spec}' must look like 'module:function'")
    added = root is not None and str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        func = getattr(importlib.import_module(mod_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise FeatureError(f"factory '{spec}': cannot import it ({exc})") from None
    finally:
        if added:
            sys.path.remove(str(root))
    return func


def load_module(path: Path, factory: str | None = None, root: Path | None = None,
                adapter_base: Path | None = None) -> nn.Module:
    """An expert as a float32 module: ``factory()`` with the checkpoint's tensors loaded
    (strict names), or a Hugging Face directory through transformers (its ``architectures``
    class, so parameter names match the checkpoint). A PEFT LoRA adapter directory is the
    module of ``adapter_base`` (the model it applies to) with the adapter applied."""
    if is_adapter_dir(path):
        return _with_adapter(path, adapter_base, factory, root)
    if factory is not None:
        module = load_factory(factory, root)()
        if not isinstance(module, nn.Module):
            raise FeatureError(f"factory '{factory}' returned a {type(module).__name__}, "
                               "not a torch.nn.Module")
        with open_checkpoint(path) as ckpt:
            state = {n: ckpt.read(n) for n in ckpt.names()}
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            what = (f"missing '{result.missing_keys[0]}'" if result.missing_keys
                    else f"unexpected '{result.unexpected_keys[0]}'")
            raise FeatureError(f"{path}: does not fit the module factory '{factory}' builds "
                               f"({what}; {len(result.missing_keys)} missing, "
                               f"{len(result.unexpected_keys)} unexpected)")
        return module.float().eval()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FeatureError(f"{path}: features need the expert as a torch module: a Hugging Face "
                           "directory with config.json, or calibration.factory: 'module:function'")
    transformers = _transformers(path)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        return cls.from_pretrained(str(path), dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureError(f"{path}: transformers cannot load it as a model "
                           f"({first_line(exc)})") from None


def _with_adapter(adapter: Path, base: Path | None, factory: str | None,
                  root: Path | None) -> nn.Module:
    """``base``'s module with every tensor the adapter changes set to base + scale * B @ A
    (or its ``modules_to_save`` copy), exactly as the merge reads them (``LoraCheckpoint``)."""
    if base is None:
        raise FeatureError(f"{adapter}: is a LoRA adapter; its features need the model it "
                           "applies to: give the recipe a base_model, or write 'model+adapter'")
    module = load_module(base, factory, root)
    state = module.state_dict()  # views of the module's own tensors
    with open_checkpoint(base) as base_ckpt, LoraCheckpoint(adapter, base_ckpt) as ckpt:
        for name in sorted({*ckpt.low_rank, *ckpt.full}):
            if name not in state:
                raise FeatureError(f"{adapter}: the adapter changes '{name}', which the module "
                                   f"loaded from {base} ({type(module).__name__}) does not have")
            with torch.no_grad():
                state[name].copy_(ckpt.read(name))
    return module


def adapted_names(model: Path, adapter_base: Path | None) -> list[str]:
    """The tensor names an expert's checkpoint holds (an adapter: its base's)."""
    if is_adapter_dir(model) and adapter_base is not None:
        with open_checkpoint(adapter_base) as base_ckpt, \
                LoraCheckpoint(model, base_ckpt) as ckpt:
            return ckpt.names()
    with open_checkpoint(model) as ckpt:
        return ckpt.names()


def _transformers(path: Path) -> ModuleType:
    """The transformers module, or a one-line error: it is optional (the ``bench`` extra)."""
    try:
        import transformers
    except ImportError:
        raise FeatureError(f"{path}: loading a Hugging Face model or tokenizer needs transformers; "
                           "install it (pip install 'transformers>=4.56', or the mergewise[bench] "
                           "extra) or use calibration.factory with tensor inputs") from None
    return transformers


def load_tokenizer(path: Path | None) -> Tokenizer | None:
    """The tokenizer of a model directory (or of a file's directory), None where it holds none."""
    if path is None:
        return None
    directory = path if path.is_dir() else path.parent
    transformers = _transformers(directory)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError):
        return None


def calibration_settings(data_path: Path, num_examples: int, batch_size: int, max_length: int,
                         seed: int, text_field: str, *, pack: bool = False,
                         accumulate: str = "float64") -> dict[str, str | int | None]:
    """What the statistics depend on besides the model (recorded in the stats file). The data
    is identified by its content (``data_sha256``), so a moved project keeps its stats files;
    ``data`` (the path) is informative only. ``pack`` and ``accumulate`` are recorded only
    when not their defaults (so files written before they existed still match)."""
    digest = None
    if data_path.is_file():
        h = hashlib.sha256()
        with open(data_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"data": str(data_path.resolve()), "data_sha256": digest,
            "num_examples": num_examples, "batch_size": batch_size, "max_length": max_length,
            "seed": seed, "text_field": text_field,
            **({"pack": True} if pack else {}),
            **({"accumulate": accumulate} if accumulate != "float64" else {})}
