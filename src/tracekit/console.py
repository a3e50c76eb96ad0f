"""The one place human-facing output is created.

Progress bars, notices and errors go to stderr (``err_console``); results (tables, JSON)
go to stdout (``out_console``), so ``tracekit ... --json | jq`` works. Library code below
the CLI logs with :mod:`logging` and never prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

err_console = Console(stderr=True)
out_console = Console()


def debug_enabled() -> bool:
    """Whether ``TRACEKIT_DEBUG`` asks for tracebacks and debug logging."""
    return os.environ.get("TRACEKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _rate_text(task: Any) -> Any:
    """Throughput of a task: ``<rate> <unit>/s``, with the unit from the task's fields."""
    from rich.text import Text

    unit = task.fields.get("unit", "it")
    speed = task.finished_speed or task.speed
    if not speed:
        return Text(f"- {unit}/s", style="progress.data.speed")
    return Text(f"{speed:,.1f} {unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(transient: bool = False) -> Iterator[Progress]:
    """A rich progress bar on stderr with count, rate (``unit`` task field) and ETA."""
    # imported here: rich.progress is a fifth of the CLI's import time, and --help needs none
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        RenderableColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RateColumn(RenderableColumn):
        def render(self, task: Any) -> Any:
            return _rate_text(task)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=not err_console.is_terminal and os.environ.get("TRACEKIT_PROGRESS") != "1",
    )
    with progress:
        yield progress
