"""Where output goes: stdout carries only references (for `$(...)` chaining); everything a person
reads (logs, tables, progress) goes to stderr through `err`."""

from __future__ import annotations

import sys
from typing import Any

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



def emit(reference: str) -> None:
    """Print the reference of what a stage made: the only thing a stage writes to stdout."""
    sys.stdout.write(f"{reference}\n")
    sys.stdout.flush()


def emit_json(obj: Any) -> None:
    """Machine-readable output of show/list commands (`--json`)."""
    from mhr.cache import dumps_json

    sys.stdout.write(dumps_json(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


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
