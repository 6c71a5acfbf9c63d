"""Where output goes: stdout carries only references (for `$(...)` chaining); everything a person
reads (logs, tables, progress) goes to stderr through `err`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True, highlight=False)

T = TypeVar("T")


def emit(reference: str) -> None:
    """Print the reference of what a stage made: the only thing a stage writes to stdout."""
    sys.stdout.write(f"{reference}\n")
    sys.stdout.flush()


def emit_json(obj: Any) -> None:
    """Machine-readable output of show/list commands (`--json`)."""
    from mhr.cache import dumps_json

    sys.stdout.write(dumps_json(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    err.print(message)


def progress() -> Progress:
    """A rich progress bar on stderr, transient so logs stay readable."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (silent when stderr is not a terminal)."""
    with progress() as bar:
        task = bar.add_task(description, total=total, info="")
        for item in items:
            yield item
            bar.advance(task)
