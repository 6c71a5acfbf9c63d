"""The `mhr` command line: typer wiring only; each command calls one library function."""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer

from mhr.cli.common import Context
from mhr.console import err
from mhr.errors import MhrError
from mhr.workspace import Workspace

app = typer.Typer(
    name="mhr",
    help=(
        "Train generative sequential recommenders decoded by prior-conditioned heads.\n\n"
        "Pipeline: mhr data … → mhr priors build → mhr windows build → mhr train → mhr eval → "
        "mhr recommend / mhr report; or `mhr run stages/<recipe>.toml` for a whole experiment. "
        "Every stage prints the reference of what it made on stdout; logs go to stderr."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def root(
    ctx: typer.Context,
    workspace: str = typer.Option(
        None, "--workspace", "-w", envvar="MHR_WORKSPACE", help="Artifact root (default: ./workspace)."
    ),
    dataset: str = typer.Option(
        None, "--dataset", "-d", envvar="MHR_DATASET", help="Dataset name (default: the only one)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
) -> None:
    ctx.obj = Context(Workspace.from_option(workspace), dataset, verbose)


def _register() -> None:
    from mhr.cli import data, evaluate, priors, report, run, status, train, windows

    app.add_typer(data.app, name="data")
    app.add_typer(priors.app, name="priors")
    app.add_typer(windows.app, name="windows")
    for module in (train, evaluate, report, run, status):
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps MhrError to one red line + hint and its exit code."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in args or "-v" in args or os.environ.get("MHR_VERBOSE") == "1"
    try:
        app(args=args, prog_name="mhr", standalone_mode=False)
    except MhrError as e:
        if verbose:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {e.message}", soft_wrap=True)
        if e.hint:
            err.print(f"[dim]hint: {e.hint}[/]", soft_wrap=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("[red]aborted[/]")
        sys.exit(130)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: nothing half-written was kept; rerun to complete")
        sys.exit(130)
