"""`mhr run stages/<recipe>.toml`: a whole experiment, every stage cached."""

from __future__ import annotations

from pathlib import Path

import typer

from mhr.cli.common import context, parse_list
from mhr.console import emit, err
from mhr.recipe import WAIT


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        ctx: typer.Context,
        recipe: Path = typer.Argument(..., help="Recipe TOML, e.g. stages/quickstart.toml."),
        only: str = typer.Option("", help="Only these variants (comma-separated)."),
        seeds: str = typer.Option("", help="Override the recipe's seeds, e.g. 0,1,2."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        force: bool = typer.Option(False, help="Rebuild every stage even if cached."),
        wait: float = typer.Option(
            WAIT, help="Seconds a step waits for a lock another process holds (a concurrent recipe on the "
            "same dataset) before giving up as busy."),
    ) -> None:
        """Run a recipe: data → priors → windows → train (variants × seeds) → eval → report.

        A rerun only does what changed. Prints the report's index.md path.
        """
        from mhr.recipe import run_recipe

        c = context(ctx)
        result = run_recipe(recipe, c.workspace, force=force, only=parse_list(only) or None,
                            seeds=parse_list(seeds, int) or None, device=device, wait=wait)
        if result.report:
            err.print(f"report: {result.report}")
            emit(str(result.report))
