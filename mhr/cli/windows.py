"""`mhr windows …` commands: cut the store into training windows and the valid/test split."""

from __future__ import annotations

import typer
from rich.table import Table

from mhr.cli.common import context
from mhr.console import emit, emit_json, err

app = typer.Typer(help="Training windows and the valid/test split.", no_args_is_help=True)


def _summary(info: dict) -> Table:
    s, p = info["stats"], info["params"]
    held = f", H = {p['holdout']}" if "holdout" in p else ""
    mark = " (current: used by train and eval without --windows)" if info.get("default") else ""
    table = Table(title=f"{info['reference']}  T = {p['context']}, τ = {p['horizon']}{held}, protocol {p['protocol']}"
                  f"{mark}", title_justify="left")
    table.add_column("")
    table.add_column("users", justify="right")
    table.add_column("rows", justify="right")
    table.add_row("train", f"{s['n_users_train']:,}", f"{s['n_train_windows']:,} windows")
    table.add_row("valid", f"{s['n_users_valid']:,}", f"{s['n_users_valid']:,}")
    table.add_row("test", f"{s['n_users_test']:,}", f"{s['n_users_test']:,}")
    table.add_row(f"too short (< {s['min_interactions']})", f"{s['n_users_too_short']:,}", "left out")
    table.caption = (
        f"{s['n_train_positions']:,} input positions, {s['n_train_targets']:,} training targets; "
        f"{s['n_store_items']:,} items (max id {s['max_item_id']:,}), {s['n_events']} event types"
        + ("" if info["current"] else "; [red]stale: built from another version of the dataset[/]")
    )
    return table


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
    from mhr.windows import build_windows, describe_windows

    ds = context(ctx).dataset()
    key, _, cached = build_windows(ds, context=context_, horizon=horizon, protocol=protocol, force=force,
                                   holdout=holdout)
    info = describe_windows(ds, key)
    if cached:
        err.print(f"cached: {info['reference']} (key {key[:12]}), now the current windows")
    else:
        err.print(_summary(info))
        short = info["stats"]["n_users_too_short"]
        if short:
            err.print(f"[yellow]{short:,} users have fewer than {info['stats']['min_interactions']} "
                      "interactions and were left out[/]")
    emit(info["reference"])


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(None, help="Windows reference or key prefix \\[default: the current: the last built]."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
) -> None:
    """Describe built windows: parameters, users per split, windows, users too short."""
    from mhr.windows import describe_windows

    info = describe_windows(context(ctx).dataset(), ref)
    if as_json:
        emit_json(info)
    else:
        err.print(_summary(info))
        for name, size in sorted(info["files"].items()):
            err.print(f"  {name}  {size:,} bytes")
        emit(info["reference"])
