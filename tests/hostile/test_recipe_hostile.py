"""Hostile recipe files: YAML bombs, huge files, deep nesting, encodings, YAML 1.1 pitfalls, and a
randomized loader test. Every case ends in seconds with a Recipe or ONE line naming the file and
the problem (``MergewiseError``) -- never a traceback, a hang, or a silently different merge.

Bounds (recipe.py): a recipe file is at most 1 MiB (real ones are a few kB, and the recipe is
copied into every output shard's header); nesting at most 20 levels; aliases may expand the
document to at most 2 Mi nodes + scalar characters; a parameter takes at most 1024 filter
entries or gradient anchors; a recipe at most 10,000 filter entries in all. YAML 1.2 exponent
floats (``5e-1``, ``1.0e5``) are floats, as YAML 1.2 and mergekit (pydantic turns the YAML 1.1
string into a number) read them.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ckpt_helpers import Family, load_dir, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergewise import MergewiseError, load_recipe, merge, parse_recipe
from mergewise.recipe import MAX_RECIPE_BYTES, Recipe
from mergewise.registry import METHODS as METHOD_REGISTRY

HEAD = "merge_method: ties\nbase_model: base\nmodels: [a, b]\n"


@contextlib.contextmanager
def hang_guard(seconds: int = 60) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs past ``seconds``."""
    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_refused(path: Path, *needles: str) -> str:
    with hang_guard(), pytest.raises(MergewiseError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and len(msg) <= 400 + len(str(path)), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def billion_laughs(levels: int = 9) -> str:
    """Each anchor lists the previous one 9 times: ~530 bytes, 9**9 leaves once expanded."""
    lines = ["  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return HEAD + "parameters:\n" + "\n".join(lines) + f"\n  density: *l{levels}\n"


# --- bombs and sizes ---------------------------------------------------------------------------

def test_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    text = billion_laughs()
    assert len(text.encode()) < 700
    path = write_recipe(tmp_path / "bomb.yaml", text)
    load_refused(path, "aliases (*name) expand the recipe past 2,097,152", "alias bomb")


def test_alias_bomb_cli(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "bomb.yaml", billion_laughs())
    with hang_guard():
        assert_one_line_error(run_cli("merge", path, "--dry-run"), str(path), "alias bomb")


def test_small_aliases_still_work(tmp_path: Path) -> None:
    """Anchors for shared parameter blocks are normal YAML and stay accepted."""
    text = ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: &p "
            "{weight: 0.5, density: 0.7}\n  - model: b\n    parameters: *p\n")
    rec, _ = load_recipe(write_recipe(tmp_path / "r.yaml", text))
    assert rec.models[0].parameters == rec.models[1].parameters == {"weight": 0.5, "density": 0.7}


def test_recursive_alias(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", HEAD + "parameters:\n  density: &r [0.5, *r]\n")
    load_refused(path, "at line 5:", "or an alias refers to itself")


def test_deep_nesting(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", HEAD + "parameters:\n  density: "
                        + "[" * 200_000 + "]" * 200_000 + "\n")
    load_refused(path, "invalid YAML at line 5", "nested more than 20 levels deep")


def test_deep_nesting_by_aliases(tmp_path: Path) -> None:
    chain = ["  a0: &a0 [[[[[1]]]]]"] + [f"  a{i}: &a{i} [[[[[*a{i - 1}]]]]]" for i in range(1, 8)]
    path = write_recipe(tmp_path / "r.yaml", HEAD + "x:\n" + "\n".join(chain) + "\n")
    load_refused(path, "nested more than 20 levels deep once aliases are expanded")


def test_huge_file_is_refused_unread(tmp_path: Path) -> None:
    """The 10 MB / 140k-filter recipe: refused by size, before YAML reads a byte of it."""
    entries = "".join(f"    - {{filter: layers.{i}.mlp, value: 0.5}}\n" for i in range(140_000))
    path = write_recipe(tmp_path / "r.yaml", HEAD + "parameters:\n  density:\n" + entries)
    assert path.stat().st_size > 5 * MAX_RECIPE_BYTES
    load_refused(path, "the recipe is larger than 1 MiB (1,048,576 bytes)")


def test_too_many_filters_per_parameter(tmp_path: Path) -> None:
    entries = "".join(f"    - {{filter: layers.{i}., value: 0.5}}\n" for i in range(1100))
    path = write_recipe(tmp_path / "r.yaml", HEAD + "parameters:\n  density:\n" + entries)
    load_refused(path, "parameters: 'density' has 1100 filter entries; at most 1024 per parameter")


def test_too_many_filters_in_all() -> None:
    entries = [{"filter": f"layers.{i}.", "value": 0.5} for i in range(1000)]
    models = [{"model": f"m{i}", "parameters": {"weight": entries, "density": entries}} for i in range(6)]
    with pytest.raises(MergewiseError) as exc:
        parse_recipe({"merge_method": "ties", "base_model": "base", "models": models}, "r.yaml")
    assert str(exc.value) == ("r.yaml: 12000 filter entries in all; at most 10000 (merge fewer, "
                              "broader patterns)")


def test_too_many_gradient_anchors() -> None:
    with pytest.raises(MergewiseError) as exc:
        parse_recipe({"merge_method": "slerp", "models": ["a", "b"], "parameters": {"t": [0.5] * 5000}})
    assert "'t' has 5000 gradient anchors; at most 1024" in str(exc.value)


def test_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    long = "x" * 100_000
    for data in ({"merge_method": long, "models": ["a"]},
                 {"merge_method": "ties", "base_model": "b", "models": ["a"], long: 1},
                 {"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {long: 1}},
                 {"merge_method": "ties", "base_model": "b", "models": ["a"],
                  "parameters": {"aggregate": long}},
                 {"merge_method": "ties", "base_model": "b", "models": ["a"],
                  "parameters": {"density": [{"filter": "x", "value": [[long]]}]}},
                 {"merge_method": "ties", "base_model": "b", "models": ["a"],
                  "sparsify": {"method": long}}):
        with pytest.raises(MergewiseError) as exc:
            parse_recipe(data, "r.yaml")
        # bounded whatever the user's value: 400 characters beyond the list of known names
        # (which grows with the registry, not with the input)
        known = len(", ".join(METHOD_REGISTRY.names()))
        assert len(str(exc.value)) <= 400 + known and "\n" not in str(exc.value), str(exc.value)[:500]
        assert long[:200] not in str(exc.value)


# --- a large but legal recipe: thousands of distinct globs, merged in seconds --------------------

def _globs(n: int) -> list[str]:
    """``n`` distinct glob patterns, each matching every tensor (all names end in 'weight'):
    each letter written as itself, as [letter] or as ?; prefixed by '*' or '*.'. 1458 in all."""
    out = []
    for prefix in ("*", "*."):
        for code in range(3 ** 6):
            letters = []
            for j, c in enumerate("weight"):
                letters.append((c, f"[{c}]", "?")[code // 3 ** j % 3])
            out.append(prefix + "".join(letters))
    assert len(set(out)) == len(out) >= n
    return out[:n]


def test_large_legal_recipe_merges_in_seconds(family_f32: Family, tmp_path: Path) -> None:
    """4,200 filter entries (600 distinct globs per parameter: weight and density per model and
    method-wide, lambda): the same merge as the scalar recipe, bit for bit; re's 512-pattern cache
    would thrash without the per-pattern cache."""
    globs = _globs(600)

    def listed(value: float) -> list[dict[str, Any]]:
        return [{"glob": g, "value": value} for g in globs]

    scalar = recipe_for(family_f32, "ties", parameters={"lambda": 0.9, "weight": 0.5, "density": 0.7})
    scalar["models"] = [{"model": m["model"], "parameters": {"weight": 0.5, "density": 0.7}}
                        for m in scalar["models"]]
    big = recipe_for(family_f32, "ties", parameters={"lambda": listed(0.9), "weight": listed(0.5),
                                                     "density": listed(0.7)})
    big["models"] = [{"model": m["model"], "parameters": {"weight": listed(0.5),
                                                          "density": listed(0.7)}}
                     for m in big["models"]]
    path = write_recipe(tmp_path / "big.yaml", yaml.safe_dump(big, sort_keys=False))
    assert 100_000 < path.stat().st_size < MAX_RECIPE_BYTES, path.stat().st_size
    with hang_guard():
        merge(path, tmp_path / "big")
    merge(scalar, tmp_path / "scalar")
    got, want = load_dir(tmp_path / "big"), load_dir(tmp_path / "scalar")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- encodings and document shapes ---------------------------------------------------------------

@pytest.mark.parametrize("data, needles", [
    ((HEAD + "name: caf\xe9\n").encode("latin-1"),
     ["not UTF-8 text (byte 0xe9 at line 4); save the recipe as UTF-8"]),
    (HEAD.encode("utf-16"), ["UTF-16 or UTF-32 text (it starts with a byte-order mark); save it as UTF-8"]),
    (HEAD.encode("utf-16-be"), ["not a text file (a NUL byte at offset 0)"]),
    (HEAD.encode("utf-32"), ["UTF-16 or UTF-32 text"]),
    (bytes(range(256)) * 8, ["not a text file (a NUL byte at offset 0); a recipe is a UTF-8 YAML file"]),
    (b"\x89PNG\r\n\x1a\n" + b"\xff" * 100, ["not UTF-8 text (byte 0x89 at line 1)"]),
    (b"", ["a recipe must be a mapping with at least merge_method and models; got an empty document"]),
    (b"# only a comment\n\n", ["got an empty document"]),
    (b"- merge_method: ties\n- models: [a]\n", ["must be a mapping", "got a list ("]),
    (b"ties\n", ["must be a mapping", "got a string ('ties')"]),
    (b"42\n", ["must be a mapping", "got a number (42)"]),
    ((HEAD + "---\n" + HEAD).encode(), ["holds more than one YAML document (another starts at line 4); "
                                        "keep one recipe per file"]),
    ((HEAD + "name: a\x07b\n").encode(), ["invalid YAML at line 4: unacceptable character #x0007"]),
    ((HEAD + "seed: " + "9" * 5000 + "\n").encode(),
     ["invalid YAML at line 4, column 7: cannot read '999", "(Exceeds the limit (4300 digits)"]),
    ((HEAD + "name: 2024-13-45\n").encode(), ["cannot read '2024-13-45' (month must be in 1..12)"]),
    ((HEAD + "name: !!python/object/apply:os.system [ls]\n").encode(),
     ["could not determine a constructor for the tag"]),
    ((HEAD + "? [a]\n: b\n").encode(), ["found unhashable key"]),
    ((HEAD + "parameters: {density: !!float abc}\n").encode(), ["cannot read 'abc'"]),
])
def test_bad_file_is_one_line(tmp_path: Path, data: bytes, needles: list[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    load_refused(path, *needles)
    assert_one_line_error(run_cli("merge", path, "--dry-run"), str(path), needles[0])


def test_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + HEAD.encode())
    assert load_recipe(path)[0].merge_method == "ties"


def test_directory_as_recipe(tmp_path: Path) -> None:
    load_refused(tmp_path, "cannot read the recipe")


# --- YAML 1.1 pitfalls -------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("5e-1", 0.5), ("5E-1", 0.5), ("1e0", 1.0), ("1.0e-1", 0.1), ("5.0e-1", 0.5), (".5e0", 0.5),
    ("+2.5e-1", 0.25), ("0.5", 0.5),
])
def test_exponent_floats_are_floats(tmp_path: Path, text: str, want: float) -> None:
    """YAML 1.1 (PyYAML) reads 5e-1 as a string; mergekit's pydantic then turns it into 0.5, and
    YAML 1.2 reads a float: mergewise reads the float too (the least surprising choice)."""
    path = write_recipe(tmp_path / "r.yaml", HEAD + f"parameters:\n  density: {text}\n")
    assert load_recipe(path)[0].parameters["density"] == want


def test_exponent_seed_and_strings(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", HEAD + "seed: 1e3\nname: '5e-1'\n")
    rec, _ = load_recipe(path)
    assert rec.seed == 1000 and type(rec.seed) is int and rec.name == "5e-1"  # quoted: a string


def test_quoted_number_says_how_to_write_it(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", HEAD + "parameters:\n  density: '0.5'\n")
    load_refused(path, "'density' must be a float", "got '0.5' (a quoted string: write the number "
                 "without quotes)")


@pytest.mark.parametrize("text, needle", [
    ("density: .nan", "'density' must be a finite number, got nan"),
    ("density: .NaN", "'density' must be a finite number, got nan"),
    ("density: -.inf", "'density' must be a finite number, got -inf"),
    ("density: 1e999", "'density' must be a finite number, got inf"),
    ("normalize: yes", None),  # YAML 1.1 reads yes as true, as mergekit does: accepted
    ("normalize: 'yes'", "'normalize' must be a bool (true or false), got 'yes'"),
])
def test_yaml_scalars(tmp_path: Path, text: str, needle: str | None) -> None:
    path = write_recipe(tmp_path / "r.yaml", HEAD + f"parameters:\n  {text}\n")
    if needle is None:
        assert load_recipe(path)[0].parameters["normalize"] is True
    else:
        load_refused(path, needle)


# --- randomized: any mapping of recipe-like keys and hostile values, any bytes ---------------------

KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "sparsify", "dtype",
        "out_dtype", "seed", "tokenizer_source", "tokenizer", "chat_template", "name", "model",
        "weight", "density", "gamma", "epsilon", "lambda", "t", "filter", "glob", "value", "method",
        "layer_range", "sources", "calibration", "drop_rate", "strength", "quantiles", "skip",
        "normalize", "scope", "aggregate", "residual_weight", "max_iter", "tokens", "source",
        "kind", "token_id", "force", "features", "data", "num_examples", "int8_mask", "rescale"]
METHODS = ["ties", "dare_ties", "task_arithmetic", "slerp", "linear", "karcher", "della",
           "breadcrumbs", "model_stock", "emr", "regmean", "passthrough", "nuslerp", "sce"]

leaf = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(-(10**30), 10**30), st.sampled_from([10**400, -(10**400), 2**63, 2**31]),
    st.booleans(), st.none(), st.text(max_size=20),
    st.sampled_from(["x" * 5000, "\u202e\u0000\ud7ff" * 50, "5e-1", "nan", "*", "[", "tadrop",
                     "magnitude", "random", "global", "float16", "a", "b", "base"]),
    st.sampled_from(METHODS))
hostile = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)), max_leaves=20)
params = st.dictionaries(st.sampled_from(KEYS), hostile | st.lists(
    st.fixed_dictionaries({"value": hostile}, optional={"filter": hostile, "glob": hostile}),
    max_size=3), max_size=4)
model = st.one_of(st.sampled_from(["a", "b", "c"]), st.fixed_dictionaries(
    {"model": st.sampled_from(["a", "b", "c"]) | hostile},
    optional={"parameters": params, "sparsify": params, "name": hostile}))
source = st.fixed_dictionaries({"model": st.sampled_from(["a", "b"]), "layer_range": hostile
                                | st.tuples(st.integers(-2, 4), st.integers(-2, 4)).map(list)},
                               optional={"parameters": params})
recipes = st.one_of(
    st.fixed_dictionaries(
        {"merge_method": st.sampled_from(METHODS) | hostile},
        optional={"base_model": st.sampled_from(["a", "base"]) | hostile, "models": st.lists(model, max_size=4),
                  "slices": st.lists(st.fixed_dictionaries({"sources": st.lists(source, max_size=3)},
                                                           optional={"parameters": params,
                                                                     "base_model": hostile}),
                                     max_size=3),
                  "parameters": params, "sparsify": params | st.just({"method": "tadrop"}),
                  "seed": hostile, "dtype": hostile, "out_dtype": hostile, "tokenizer": hostile,
                  "tokenizer_source": hostile, "chat_template": hostile, "name": hostile}),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), hostile, max_size=6),
    hostile)


def _one_line_or_recipe(load: Any, prefix: str) -> None:
    with hang_guard(30):
        try:
            result = load()
        except MergewiseError as exc:
            msg = str(exc)
            assert msg.startswith(prefix) and "\n" not in msg, msg
            assert len(msg) <= 400 + len(prefix), msg
            return
    assert isinstance(result, Recipe)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=recipes)
def test_random_recipe_dicts(data: Any) -> None:
    _one_line_or_recipe(lambda: parse_recipe(data, "r.yaml"), "r.yaml: ")


SNIPPETS = ["&a ", "*a", "[", "]", "{", "}", "\x00", "\xff", "\ufeff", "!!python/name:os.system ",
            ".nan", "5e-1", "---\n", "? ", "<<: *a\n", "!!binary ", "!!float ", "\t", "'", '"',
            "\\", "- ", ": ", "\n  ", "1e999", "9" * 4400, "2024-02-30", "!!set {a}", "%YAML 1.1\n"]
VALID = yaml.safe_dump({"merge_method": "ties", "base_model": "base", "models": [
    {"model": "a", "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.5},
                                                             {"value": 0.7}]}},
    {"model": "b"}], "parameters": {"lambda": 1.0}, "seed": 3}, sort_keys=False)


@st.composite
def mutated(draw: Any) -> bytes:
    """A valid recipe with a few cuts and hostile insertions, or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=5)) + text[at + cut:]
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_random_recipe_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    _one_line_or_recipe(lambda: load_recipe(path)[0], f"{path}: ")


def test_an_empty_slices_list_is_one_line() -> None:
    """Found by the random recipe test: ``slices: []`` was an IndexError."""
    with pytest.raises(MergewiseError) as exc:
        parse_recipe({"merge_method": "ties", "slices": []}, "r.yaml")
    assert "slices" in str(exc.value) and "\n" not in str(exc.value)
