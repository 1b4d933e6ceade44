"""A terminal progress bar over optimizer steps, showing the latest reward and staleness."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _StepBar:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, record: dict) -> None:
        if self.progress is None:
            return
        info = f"reward {record['reward_mean']:.3f} | staleness<= {record['staleness_max']} | {record['step_seconds']:.1f}s/step"
        self.progress.update(self.task, advance=1, info=info)


@contextmanager
def step_progress(total: int, enabled: bool = True, done: int = 0) -> Iterator[_StepBar]:
    """A bar over ``total`` steps of which ``done`` are behind (a resumed run)."""
    if not enabled:
        yield _StepBar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns) as progress:
        yield _StepBar(
            progress, progress.add_task("train", total=total, completed=done, info="waiting for the first batch")
        )
