"""A damaged ``config.json`` next to a model's weights: one line naming the file and the
problem, through a real merge and a dry run; nothing written. Values with a clear meaning
(``quantization_config: null``, ``architectures: null``) are accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ckpt_helpers import Family, copy_family, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli


def set_fields(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def merge_args(fam: Family, tmp_path: Path, dry_run: bool) -> list[Any]:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(fam, "ties"))
    return ["merge", recipe, *(["--dry-run"] if dry_run else ["--out", tmp_path / "out"])]


# id, the config file's bytes (or field changes), what the message must say
BAD: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("json-list", b'[{"architectures": ["LlamaForCausalLM"]}]', "is a JSON list, not an object"),
    ("json-string", b'"LlamaForCausalLM"', "is a JSON string, not an object"),
    ("json-null", b"null", "is a JSON null, not an object"),
    ("garbage-bytes", bytes(range(256)), "not UTF-8"),
    ("latin-1", '{"model_type": "llamà"}'.encode("latin-1"), "not UTF-8"),
    ("utf-16", '{"model_type": "llama"}'.encode("utf-16"), "not UTF-8"),
    ("truncated-json", b'{"architectures": ["Llama', "not valid JSON"),
    ("empty-file", b"", "not valid JSON"),
    ("utf8-bom", b'\xef\xbb\xbf{"model_type": "llama"}', "not valid JSON"),
    ("quantization-config-string", {"quantization_config": "none"},
     'quantization_config "none" (a JSON string), not an object or null'),
    ("quantization-config-list", {"quantization_config": ["gptq"]}, "quantization_config"),
    ("quantization-config-false", {"quantization_config": False}, "a JSON boolean"),
    ("architectures-null-entry", {"architectures": [None]}, "architectures [null]"),
    ("architectures-string", {"architectures": "Llama"}, 'architectures "Llama"'),
    ("architectures-number", {"architectures": [3]}, "not a list of class names"),
    ("model-type-number", {"model_type": 3}, "model_type 3, not a string"),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
@pytest.mark.parametrize("content, expect", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_one_line(family_f32: Family, tmp_path: Path,
                                content: bytes | dict[str, Any], expect: str, dry_run: bool) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    cfg = fam.experts[0] / "config.json"
    if isinstance(content, dict):
        set_fields(fam.experts[0], **content)
    else:
        cfg.write_bytes(content)
    result = run_cli(*merge_args(fam, tmp_path, dry_run))
    assert_one_line_error(result, f"{cfg}: config.json", expect)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
@pytest.mark.parametrize("changes", [
    {"quantization_config": None},
    {"quantization_config": {}},
    {"architectures": None},
    {"architectures": None, "model_type": None},
    {"model_type": None},
], ids=["quant-null", "quant-empty", "arch-null", "arch-and-type-null", "type-null"])
def test_null_fields_mean_absent(family_f32: Family, tmp_path: Path, changes: dict[str, Any],
                                 dry_run: bool) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    set_fields(fam.experts[1], **changes)
    result = run_cli(*merge_args(fam, tmp_path, dry_run))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file() != dry_run


def test_missing_architectures_is_still_compared_by_model_type(family_f32: Family,
                                                               tmp_path: Path) -> None:
    """An expert without architectures but of another model_type is still a mixed merge."""
    fam = copy_family(family_f32, tmp_path / "fam")
    set_fields(fam.experts[1], architectures=None, model_type="mistral")
    result = run_cli(*merge_args(fam, tmp_path, False))
    assert_one_line_error(result, "mixed architectures", str(fam.experts[1]), "mistral")
    assert not (tmp_path / "out").exists()


def test_quantized_expert_names_its_method(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    set_fields(fam.experts[0], quantization_config={"quant_method": ["odd"], "bits": 4})
    result = run_cli(*merge_args(fam, tmp_path, True))
    assert_one_line_error(result, str(fam.experts[0]), "quantized", "['odd']")
