"""``mergewise bench build|run|study|combine|tasks``: the offline benchmark's command line.

This module is imported by ``mergewise.cli`` at start-up, so it imports nothing heavy at module
level: transformers, pandas and the benchmark modules are loaded inside the commands. Without
the bench extras installed, ``mergewise --help`` still works and ``bench`` says what to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .requirements import INSTALL_HINT, missing_requirements

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Offline multi-task benchmark: MiniLM experts on six text tasks "
                             "(--zoo vision: EfficientNet-Lite0 experts on three image tasks).")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

CacheOpt = Annotated[Path | None, typer.Option(
    "--cache", help="expert cache directory (default: $MERGEWISE_BENCH_CACHE or ~/.cache/mergewise/bench)")]
TasksOpt = Annotated[str | None, typer.Option(
    "--tasks", help="comma-separated task names (default: all of the zoo's; --smoke: two)")]
ZooOpt = Annotated[str, typer.Option(
    "--zoo", help="text: MiniLM on six text tasks; vision: EfficientNet-Lite0 on three image tasks")]
ZOOS = ("text", "vision")
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="the tiny CI recipe: 2 tasks, 40 steps, small eval subsets")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", help="the zoo's training seed (data order, head init, dropout); 0 = the default zoo")]
ZooSeedsOpt = Annotated[str | None, typer.Option(
    "--zoo-seeds", help="comma-separated training seeds, one zoo each (e.g. 0,1,2); run: mean ± s.d. "
                        "over zoos and paired gains")]

SMOKE_TASKS = ("convention_party", "gi_word_polarity")


def _require(zoo: str = "text") -> None:
    """A known ``--zoo`` whose wheels are installed, else one line naming what to install."""
    if zoo not in ZOOS:
        _fail(f"--zoo: one of {', '.join(ZOOS)}, got {zoo!r}")
    if zoo == "vision":
        from .vision_tasks import VISION_INSTALL_HINT, missing_vision_requirements

        missing, hint = missing_vision_requirements(), VISION_INSTALL_HINT
    else:
        missing, hint = missing_requirements(), INSTALL_HINT
    if missing:
        err.print(f"[bold red]error:[/] the {zoo} benchmark needs {', '.join(missing)}; install "
                  f"with: {hint}", highlight=False)
        raise typer.Exit(1)


def _tasks(tasks: str | None, smoke: bool, zoo: str = "text") -> list[str]:
    if zoo == "vision":
        from .vision_run import VISION_SMOKE_TASKS as smoke_tasks
        from .vision_tasks import VISION_TASKS as known
    else:
        from .data import TASKS as known

        smoke_tasks = SMOKE_TASKS
    if tasks is None:
        return list(smoke_tasks if smoke else known)
    names = [t.strip() for t in tasks.replace(" ", ",").split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if unknown:
        _fail(f"unknown {zoo} task(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _zoo_seeds(seed: int | None, zoo_seeds: str | None) -> list[int] | None:
    """The zoo seeds asked for (None: the default single zoo); bad input is one line."""
    if seed is not None and zoo_seeds is not None:
        _fail("give --seed or --zoo-seeds, not both")
    text = str(seed) if seed is not None else zoo_seeds
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--zoo-seeds: comma-separated non-negative integers, got {text!r}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        _fail(f"--zoo-seeds: distinct non-negative integers, got {text!r}")
    return seeds


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _cache(cache: Path | None) -> Path:
    from .zoo import default_cache

    return (cache or default_cache()).expanduser()


def _guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run an evaluation command: a missing zoo is one line; Ctrl-C keeps the cached results."""
    from ..errors import MergewiseError

    try:
        return run()
    except (FileNotFoundError, MergewiseError) as exc:  # no zoo; no ray package; a bad address
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted: finished evaluations are cached; run the same command to resume")
        raise typer.Exit(130) from None


@bench_app.command()
def tasks(zoo: ZooOpt = "text") -> None:
    """List the zoo's tasks with their split sizes and class counts."""
    _require(zoo)
    if zoo == "vision":
        from .vision_tasks import VISION_TASKS, describe, load_vision_task

        for name in VISION_TASKS:
            out.print(describe(load_vision_task(name)), highlight=False)
        return
    from .data import TASKS, describe, load_task_data

    for name in TASKS:
        out.print(describe(load_task_data(name)), highlight=False)


@bench_app.command()
def build(
    cache: CacheOpt = None,
    tasks: TasksOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="fine-tuning steps per expert")] = None,
    smoke: SmokeOpt = False,
    progress: ProgressOpt = True,
    seed: SeedOpt = None,
    zoo_seeds: ZooSeedsOpt = None,
    zoo: ZooOpt = "text",
) -> None:
    """Fine-tune (or find cached) one expert per task, and a linear probe on the base encoder."""
    _require(zoo)
    from .zoo import FULL, SMOKE, build_zoo, with_seed, with_steps

    seeds = _zoo_seeds(seed, zoo_seeds) or [0]
    where = _cache(cache)
    names = _tasks(tasks, smoke, zoo)
    log = lambda s: out.print(s, highlight=False)  # noqa: E731
    t0 = time.perf_counter()
    try:
        if zoo == "vision":
            from .vision_run import build_vision

            build_vision(names, where, smoke, steps, seeds, log)
        else:
            config = with_steps(SMOKE if smoke else FULL, steps)
            for s in seeds:
                if len(seeds) > 1:
                    out.print(f"zoo seed {s}", highlight=False)
                build_zoo(names, where, with_seed(config, s), progress=progress, log=log)
    except ValueError as exc:  # a recipe number out of range (--steps 0)
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted: finished experts and the last training checkpoint are kept; "
                  "run the same command again to resume")
        raise typer.Exit(130) from None
    out.print(f"zoo ready in {where} ({time.perf_counter() - t0:.0f} s)", highlight=False)


@bench_app.command()
def run(
    methods: Annotated[str | None, typer.Option(
        "--methods", help="comma-separated registry methods; NAME+tadrop for the TADrop row "
                          "(default: the core methods and issue 16's, each with and without "
                          "+tadrop where it plugs in, plus the data-aware rows; see runner.py)")] = None,
    cache: CacheOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="results directory (also the resume cache)")] = Path(
        "bench-results"),
    tasks: TasksOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="the experts' steps (as given to build)")] = None,
    smoke: SmokeOpt = False,
    progress: ProgressOpt = True,
    seed: SeedOpt = None,
    zoo_seeds: ZooSeedsOpt = None,
    ray: Annotated[bool, typer.Option("--ray", help="merge and score candidates on Ray workers "
                                      "(a local cluster on this machine's cores unless --ray-address)")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="a running Ray cluster "
                                                    "(implies --ray)")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Ray workers (default: the local "
                                                "cores; 1 on a cluster)")] = None,
    zoo: ZooOpt = "text",
) -> None:
    """Merge the experts with each method, tune on validation, report test accuracy."""
    _require(zoo)
    from dataclasses import replace

    from ..errors import MergewiseError
    from .runner import SMOKE_RUN, RunConfig, run_benchmark, variant
    from .zoo import with_steps

    if zoo == "vision":
        from .vision_run import run_vision_benchmark, vision_run_config

        config, bench = vision_run_config(smoke), run_vision_benchmark
    else:
        config, bench = SMOKE_RUN if smoke else RunConfig(), run_benchmark
    try:
        config = replace(config, zoo=with_steps(config.zoo, steps))
    except ValueError as exc:
        _fail(str(exc))
    seeds = _zoo_seeds(seed, zoo_seeds)
    settings = None
    if ray or ray_address or workers is not None:
        from .dispatch import RaySettings

        try:
            settings = RaySettings(address=ray_address, workers=workers)
        except MergewiseError as exc:
            _fail(str(exc))
    if methods:
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        try:
            for m in names:
                variant(m, config.grids)
        except Exception as exc:  # unknown method, or a method with no TADrop row
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        config = replace(config, methods=names)
    names = _tasks(tasks, smoke, zoo)
    doc = _guarded(lambda: bench(names, _cache(cache), out_dir, config, progress=progress,
                                 log=lambda s: out.print(s, highlight=False), zoo_seeds=seeds,
                                 ray=settings))
    out.print((out_dir / "results.md").read_text(), highlight=False)
    out.print(f"wrote {out_dir / 'results.md'}, results.json, results.png ({doc['seconds']:.0f} s)",
              highlight=False)


@bench_app.command()
def study(
    name: Annotated[str, typer.Argument(help="matched | ablation | tasks")],
    cache: CacheOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="results directory (shares the run's cache)")] = Path(
        "bench-results"),
    tasks: TasksOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="the experts' steps (as given to build)")] = None,
    smoke: SmokeOpt = False,
    seed: SeedOpt = None,
    zoo: ZooOpt = "text",
) -> None:
    """TADrop vs uniform at the same p̄ (matched), rescale/strength ablation, or 2/4/6-task merges."""
    _require(zoo)
    from dataclasses import replace

    from .runner import SMOKE_RUN, RunConfig, load_zoo
    from .studies import STUDIES, run_study
    from .zoo import with_seed, with_steps

    if name not in STUDIES:
        _fail(f"unknown study '{name}'; known: {', '.join(STUDIES)}")
    if zoo == "vision":
        if name == "tasks":
            _fail("the tasks study merges 2, 4 and 6 of the text zoo's six tasks; the vision zoo "
                  "has three: run matched or ablation")
        from .vision_run import load_vision_zoo, vision_run_config

        config, load = vision_run_config(smoke), load_vision_zoo
    else:
        config, load = (SMOKE_RUN if smoke else RunConfig()), load_zoo
    try:
        config = replace(config, zoo=with_seed(with_steps(config.zoo, steps), seed))
    except ValueError as exc:
        _fail(str(exc))
    doc = _guarded(lambda: run_study(name, _tasks(tasks, smoke, zoo), _cache(cache), out_dir, config,
                                     log=lambda s: out.print(s, highlight=False), load=load))
    out.print((out_dir / f"study-{name}.md").read_text(), highlight=False)
    out.print(f"wrote {out_dir / f'study-{name}.md'} and .json ({doc['seconds']:.0f} s)", highlight=False)


@bench_app.command()
def combine(
    results: Annotated[list[Path], typer.Argument(help="two or more zoos' results.json (or their "
                                                   "directories), each from `bench run --seed S`")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="where the combined results.json "
                                          "and results.md go")] = Path("bench-results"),
    shared_rows: Annotated[bool, typer.Option(
        "--shared-rows", help="pool only the rows every zoo has (zoos run with different "
                              "--methods); the dropped rows are listed")] = False,
    every_row: Annotated[bool, typer.Option(
        "--all-rows", help="pool every row over the zoos that ran it (its zoo count in the "
                           "table); each claim over the zoos that ran both rows")] = False,
) -> None:
    """Pool zoos run apart (other sessions, machines): mean ± s.d. per row and paired gains."""
    from .zoos import combine as pool
    from .zoos import common_rows, markdown, read_zoo_docs, write_combined

    if shared_rows and every_row:
        _fail("--shared-rows and --all-rows are two ways to pool zoos run with different "
              "--methods; give one")
    dropped: list[str] = []
    try:
        docs, seeds = read_zoo_docs(results, shared_rows or every_row)
        if shared_rows:
            docs, dropped = common_rows(docs)
        doc = pool(docs, seeds, every_row)
        if shared_rows:
            doc["rows_not_in_every_zoo"] = dropped
    except (ValueError, KeyError) as exc:
        _fail(str(exc) if isinstance(exc, ValueError) else
              f"a row lacks {exc} (run with a mergewise that records per-example results)")
    write_combined(out_dir, doc)
    out.print(markdown(doc), highlight=False)
    if dropped:
        out.print(f"not pooled (not in every zoo): {', '.join(dropped)}", highlight=False)
    out.print(f"wrote {out_dir / 'results.md'} and results.json (zoo seeds "
              f"{', '.join(map(str, seeds))})", highlight=False)
