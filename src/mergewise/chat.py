"""The output's chat template (mergekit's ``chat_template``): ``auto`` (the template most of the
models share), ``chatml`` (bundled), or a Jinja template written in the recipe.

mergekit also bundles alpaca, llama3, mistral and exaone; mergewise does not ship copies of
those: paste the template text instead (a one-line error says so).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .errors import RecipeError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BUILTIN = {"chatml": CHATML}
NOT_BUNDLED = ("alpaca", "llama3", "mistral", "exaone")
JINJA_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def model_template(directory: Path | None) -> str | None:
    """A model directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    if directory is None:
        return None
    if (directory / JINJA_FILE).is_file():
        return (directory / JINJA_FILE).read_text(encoding="utf-8")
    try:
        value = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8")).get(
            "chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def chat_template(setting: str, model_dirs: Sequence[Path | None]) -> str:
    """The template ``setting`` stands for, given the merge's model directories."""
    if setting == "auto":
        found = [t for t in (model_template(d) for d in model_dirs) if t]
        if not found:
            raise RecipeError("chat_template: auto, but none of the models has a chat template")
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best)  # ties: the first model's
    if setting in BUILTIN:
        return BUILTIN[setting]
    if setting in NOT_BUNDLED:
        raise RecipeError(f"chat_template: '{setting}' is one of mergekit's bundled templates, "
                          "which mergewise does not ship; paste the Jinja template text, or use "
                          "auto or chatml")
    if "{" not in setting or len(setting) < 20:
        raise RecipeError(f"chat_template: {setting[:40]!r} is neither auto, chatml nor a Jinja "
                          "template")
    return setting


def template_files(template: str, tokenizer_dir: Path | None) -> dict[str, str]:
    """The files that carry ``template``: chat_template.jinja, and tokenizer_config.json
    without a conflicting ``chat_template`` key."""
    out = {JINJA_FILE: template}
    path = tokenizer_dir / TOKENIZER_CONFIG if tokenizer_dir is not None else None
    if path is not None and path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return out
        if isinstance(config, dict) and "chat_template" in config:
            config["chat_template"] = template
            out[TOKENIZER_CONFIG] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return out
