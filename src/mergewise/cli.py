"""The ``mergewise`` command line: merge, materialize, methods, inspect, example.

Every user error is printed on one line (``error: ...``) with a non-zero exit; no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import lazytorch
from .errors import MergewiseError
from .registry import METHODS, SPARSIFIERS
from .version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned models of one pretrained base (TADrop, TIES, DARE, ...).")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# The bench sub-app module imports only typer/rich; transformers loads inside its commands.
from .bench.cli import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def _fail(exc: BaseException) -> None:
    # escape: paths and values in the message may contain [...] that rich would eat as markup
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _one_line(interrupted: str = "nothing was written") -> Iterator[None]:
    """A command body's errors as one line: mergewise's own, an interrupt (Ctrl-C, SIGTERM,
    SIGHUP: exit 128 + signal) and the system's (disk full, permissions: exit 1)."""
    from . import interrupts

    try:
        yield
    except MergewiseError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        err.print(f"{interrupts.describe(exc)}: {interrupted}", highlight=False)
        exc.reported = True  # type: ignore[attr-defined] # entry.main prints no second line
        raise typer.Exit(interrupts.exit_code(exc)) from exc
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(MergewiseError(f"{where}{exc.strerror or exc}"))


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="output directory")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (maths only; masks drawn on CPU)")] = "cpu",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the plan")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output")] = False,
    shard_size: Annotated[str, typer.Option("--shard-size", help="max bytes per shard, e.g. 5GB")] = "5GB",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    stats_cache: Annotated[Path | None, typer.Option(
        "--stats-cache", help="keep per-tensor statistics (TADrop's d) here across runs; "
        "default $MERGEWISE_STATS_CACHE")] = None,
    out_format: Annotated[str, typer.Option(
        "--out-format", help="hf (full weights) or lora (a PEFT adapter: truncated SVD of "
        "each module's merged task vector)")] = "hf",
    lora_rank: Annotated[int | None, typer.Option(
        "--lora-rank", help="lora: the rank of every module")] = None,
    lora_energy: Annotated[float | None, typer.Option(
        "--lora-energy", help="lora: per module, the least rank keeping this share of "
        "||delta||_F^2, e.g. 0.99")] = None,
) -> None:
    """Merge the checkpoints a recipe names into --out (written atomically)."""
    if out_dir is None and not dry_run:
        _fail(MergewiseError("--out DIR is required (or use --dry-run)"))
    if dry_run:  # planning reads headers only: torch loads if something needs it after all
        lazytorch.defer()
    with _one_line():
        from .api import merge as run_merge
        from .runtime import keep_freed_buffers

        keep_freed_buffers()
        result = run_merge(recipe, out_dir, overwrite=overwrite, device=device,
                           shard_size=shard_size, dry_run=dry_run, progress=progress,
                           stats_cache=stats_cache, out_format=out_format,
                           lora_rank=lora_rank, lora_energy=lora_energy)
    if dry_run:
        out.print("[bold]plan[/] (dry run, nothing written)")
        for line in result.summary.lines():
            out.print(f"  {line}", highlight=False)
        return
    out.print(f"merged {result.summary.tensors} tensors in {result.seconds:.1f} s", highlight=False)
    out.print(f"output: {result.out}", highlight=False, markup=False)
    if result.lora is not None:
        from .lora_out import summary_line
        out.print(summary_line(result.lora), highlight=False, markup=False)
    if result.modulators is not None:
        mods = result.modulators
        out.print(f"modulators: {mods['bytes']:,} bytes for {len(mods['tasks'])} tasks "
                  f"(1 bit per parameter per task), {mods['ratio_to_experts']:.4f} of the "
                  f"{len(mods['tasks'])} full experts' {mods['experts_bytes']:,} bytes; "
                  f"task models: mergewise materialize {result.out} --task NAME --out DIR",
                  highlight=False, markup=False)
    out.print(f"report: {result.report_path}", highlight=False, markup=False)


@app.command()
def materialize(
    merged: Annotated[Path, typer.Argument(help="output directory of an EMR merge")],
    task: Annotated[str, typer.Option("--task", "-t", help="task name (a model's name in the recipe)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="where the task's checkpoint goes")],
    base: Annotated[Path | None, typer.Option("--base", "-b", help="the merge's base model "
                                              "(default: the path recorded at merge time)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output")] = False,
    shard_size: Annotated[str, typer.Option("--shard-size", help="max bytes per shard, e.g. 5GB")] = "5GB",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Write one task's model of an EMR merge as a normal checkpoint directory.

    The task's weights are base + rescaler * (mask * unified task vector), from the merge's
    unified model and modulators.safetensors; the output is written atomically.
    """
    with _one_line():
        from .task_models import materialize as run_materialize

        target = run_materialize(merged, task, out_dir, base=base, overwrite=overwrite,
                                 shard_size=shard_size, device=device)
    out.print(f"task '{task}': {target}", highlight=False, markup=False)


@app.command()
def features(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe with calibration: blocks")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", "-o", help="where stats files of models without a features: path go")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="recompute existing stats files")
                         ] = False,
    device: Annotated[str, typer.Option(help="where the experts run: cpu or cuda")] = "cpu",
) -> None:
    """Capture calibration features (Gram matrices, norm energies; the diagonal Fisher for
    merge_method: fisher) into stats files, no merge."""
    from .api import compute_features
    from .features import CaptureReport

    def show(r: CaptureReport) -> None:
        out.print(f"{r.task}: {r.examples} examples, {r.rows} rows, {r.layers} layers, "
                  f"{r.seconds:.1f} s -> {r.path}", highlight=False, markup=False)

    with _one_line(interrupted="stats files finished before it are kept"):
        reports = compute_features(recipe, out_dir, overwrite=overwrite, device=device,
                                   progress=show)
    if not reports:
        out.print("every stats file exists already (use --overwrite to recompute)")


@app.command()
def methods(
    markdown: Annotated[bool, typer.Option("--markdown", help="print docs/methods.md")] = False,
) -> None:
    """List merge methods and sparsifiers with their parameters and defaults."""
    lazytorch.defer()  # the declarations need no torch
    from .params import step_specs

    if markdown:
        from .docs import methods_markdown

        sys.stdout.write(methods_markdown())
        return
    for m in METHODS:
        needs = "base required" if m.requires_base else "no base needed"
        if m.task_specific:
            needs += "; one model per task: mergewise materialize"
        needs += "; sparsify: block " + ("accepted" if m.accepts_sparsify else "not accepted")
        out.print(f"[bold]{m.name}[/] ({m.space} space, {needs})", highlight=False)
        for p in m.params:
            out.print(f"    {p.describe()}", highlight=False, markup=False)
        for p in m.model_params:
            out.print(f"    {p.describe()} [per model]", highlight=False, markup=False)
        if m.sparsifier:
            sp = SPARSIFIERS.get(m.sparsifier)
            for p in step_specs(m, sp, from_block=False).values():
                out.print(f"    {p.describe()} [per model, {sp.name} step]", highlight=False,
                          markup=False)
    out.print("\n[bold]sparsifiers[/] (use in a `sparsify:` block: {method: NAME, ...})")
    for s in SPARSIFIERS:
        out.print(f"[bold]{s.name}[/]", highlight=False)
        for p in s.params:
            out.print(f"    {p.describe()}", highlight=False, markup=False)


@app.command()
def example(
    directory: Annotated[Path, typer.Argument(help="where to build and merge")] = Path(
        "mergewise-example"),
) -> None:
    """Build a tiny base + 3 fine-tuned Llama-style checkpoints and merge them with TIES."""
    from .example import run_example

    with _one_line():
        result = run_example(directory, progress=sys.stderr.isatty())
    out.print(f"example checkpoints and recipe: {directory / 'models'}, {directory / 'recipe.yaml'}",
              highlight=False)
    out.print(f"merged model: {result.out}", highlight=False)
    out.print(f"report: {result.report_path}", highlight=False, markup=False)
    out.print(f"({result.summary.tensors} tensors, {result.summary.parameters:,} parameters per "
              f"model, {result.seconds:.2f} s)", highlight=False)


def _tadrop_options(**given: object) -> dict[str, object]:
    """inspect's TADrop options, each checked by its declared Param (finite, in range) under
    its flag's name, so ``--drop-rate nan`` is refused before any tensor is read."""
    specs = {p.name: p for p in SPARSIFIERS.get("tadrop").params}
    return {name: specs[name].check(value, "--" + name.replace("_", "-"))
            for name, value in given.items()}


@app.command()
def inspect(
    experts: Annotated[list[str], typer.Argument(help="fine-tuned checkpoint(s)")],
    base: Annotated[str, typer.Option("--base", "-b", help="pretrained base checkpoint")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="where tables and PNG plots go")] = None,
    drop_rate: Annotated[float, typer.Option(help="TADrop target mean drop rate p̄")] = 0.8,
    strength: Annotated[float, typer.Option(help="TADrop strength γ")] = 1.0,
    budget: Annotated[str, typer.Option(help="median or elements")] = "median",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """TADrop statistics of experts' task vectors (d, drop rate per tensor) and plots, no merge."""
    from .inspection import inspect_experts
    from .report import kind_summary

    try:
        tadrop = _tadrop_options(drop_rate=drop_rate, strength=strength, budget=budget)
        result = inspect_experts(experts, base, out_dir, device=device, tadrop=tadrop)
    except MergewiseError as exc:
        _fail(exc)
        return
    for task, d_ref in zip(dict.fromkeys(r["task"] for r in result.rows), result.d_ref, strict=True):
        out.print(f"[bold]{task}[/] (d_ref = {d_ref if d_ref is None else f'{d_ref:.4f}'})",
                  highlight=False)
        for s in kind_summary([r for r in result.rows if r["task"] == task]):
            mean_d = "-" if s["mean_d"] is None else f"{s['mean_d']:.3f}"
            out.print(f"    {s['kind']:<10} tensors {s['tensors']:>4}  elements {s['numel']:>12,}  "
                      f"mean d {mean_d}", highlight=False)
    for f in result.files:
        out.print(f"wrote {f}", highlight=False)


@app.command()
def version() -> None:
    """Print the mergewise version."""
    out.print(__version__)


def main() -> None:
    """The app alone (``python -m mergewise.cli``); the console script is ``entry.main``, which
    adds the signal handlers and the one-line interrupt from the first import on."""
    app()


if __name__ == "__main__":
    main()
