"""`mhr windows …` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="windows commands", no_args_is_help=True)
