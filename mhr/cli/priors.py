"""`mhr priors …` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="priors commands", no_args_is_help=True)
