"""`mhr windows …` commands: cut the store into training windows and the valid/test split."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from mhr.cli.common import context, dataclass_options, from_options, with_options
from mhr.console import emit, emit_json, err
from mhr.windows import WindowsParams

app = typer.Typer(help="Training windows and the valid/test split.", no_args_is_help=True)


def build_cmd(
    ctx: typer.Context,
    force: bool = typer.Option(False, help="Rebuild even if windows with the same key exist."),
    **options: Any,
) -> None:
    """Cut every user's history into training windows and valid/test targets; prints `windows:<key>`.

    The windows built (or found cached) become the dataset's current ones: `mhr train` uses them
    unless given --windows.

    Examples: mhr windows build --context 50 --horizon 8 ·
    mhr windows build --context 50 --horizon 4 --holdout 8 (train at τ = 4, evaluate at h ≤ 8)
    """
    from mhr.windows import build_windows, log_build

    ds = context(ctx).dataset()
    params = from_options(WindowsParams, options)
    key, _, cached = build_windows(ds, force=force, **dataclasses.asdict(params))
    emit(log_build(ds, key, cached))


app.command("build")(with_options(build_cmd, dataclass_options(WindowsParams)))


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(None, help="Windows reference or key prefix \\[default: the current: the last built]."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
) -> None:
    """Describe built windows: parameters, users per split, windows, users too short."""
    from mhr.windows import describe_windows, summary_table

    info = describe_windows(context(ctx).dataset(), ref)
    if as_json:
        emit_json(info)
    else:
        err.print(summary_table(info))
        for name, size in sorted(info["files"].items()):
            err.print(f"  {name}  {size:,} bytes")
        emit(info["reference"])
