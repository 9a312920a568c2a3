"""A rich progress bar for the stats and merge passes, with tensors/s and GB/s."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Callback = Callable[[str, int], None]


class RateColumn(ProgressColumn):
    """tensors/s and GB/s read, from the task's elapsed time and its ``bytes`` field."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("-- tensors/s  -- GB/s", style="progress.data.speed")
        gbs = task.fields.get("bytes", 0) / elapsed / 1e9
        return Text(f"{task.completed / elapsed:6.1f} tensors/s {gbs:6.2f} GB/s",
                    style="progress.data.speed")


@contextmanager
def merge_progress(enabled: bool, tensors: Sequence[Any], summary: Any
                   ) -> Iterator[tuple[Callback | None, Callback | None]]:
    """Callbacks for the stats and merge passes over ``tensors`` (the plan of every job)."""
    if not enabled:
        yield None, None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        merged = sum(1 for t in tensors if t.merged)
        stats_task = None
        if summary.stats_passes:
            stats_task = bar.add_task("stats pass", total=merged * summary.stats_passes, bytes=0)
        merge_task = bar.add_task("merge", total=len(tensors), bytes=0)

        def on_tensor(name: str, nbytes: int) -> None:
            bar.update(merge_task, advance=1,
                       bytes=bar.tasks[merge_task].fields["bytes"] + nbytes)

        def on_stats(name: str, nbytes: int) -> None:
            if stats_task is not None:
                bar.update(stats_task, advance=1,
                           bytes=bar.tasks[stats_task].fields["bytes"] + nbytes)

        yield on_tensor, on_stats
