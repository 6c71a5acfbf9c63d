"""`mhr windows …` commands: cut the store into training windows and the valid/test split."""

from __future__ import annotations

import typer

from mhr.cli.common import context
from mhr.console import emit, emit_json, err

app = typer.Typer(help="Training windows and the valid/test split.", no_args_is_help=True)


@app.command("build")
def build_cmd(
    ctx: typer.Context,
    context_: int = typer.Option(50, "--context", "-T", help="Context length T (input positions per window)."),
    horizon: int = typer.Option(None, "--horizon", help="Forecast horizon τ \\[default: 8; 1 with --protocol loo]."),
    protocol: str = typer.Option("paper", help="paper (last τ test, τ before valid) or loo (leave-one-out, τ = 1)."),
    holdout: int = typer.Option(
        None, "--holdout", help="Held-out targets H ≥ τ per user: the last H are test, the H before them valid; "
        "training windows (horizon τ) come from the rest, so `mhr eval --horizons` may go up to H \\[default: τ]."),
    force: bool = typer.Option(False, help="Rebuild even if windows with the same key exist."),
) -> None:
    """Cut every user's history into training windows and valid/test targets; prints `windows:<key>`.

    The windows built (or found cached) become the dataset's current ones: `mhr train` uses them
    unless given --windows.

    Examples: mhr windows build --context 50 --horizon 8 ·
    mhr windows build --context 50 --horizon 4 --holdout 8 (train at τ = 4, evaluate at h ≤ 8)
    """
    from mhr.windows import build_windows, log_build

    ds = context(ctx).dataset()
    key, _, cached = build_windows(ds, context=context_, horizon=horizon, protocol=protocol, force=force,
                                   holdout=holdout)
    emit(log_build(ds, key, cached))


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
