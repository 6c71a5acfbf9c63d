"""`mhr report RUN…`: comparison table and plots."""

from __future__ import annotations

from pathlib import Path

import typer

from mhr.cli.common import context, run_name
from mhr.console import emit, err


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        ctx: typer.Context,
        runs: list[str] = typer.Argument(..., help="Runs to compare (names or run:<name>); seeds are grouped."),
        out: Path = typer.Option(None, help="Output folder (default: <dataset>/reports/<first run>)."),
        split: str = typer.Option("test", help="Which evaluation split to report."),
        fusion: str = typer.Option("max", help="Which fusion's evaluations to report."),
        title: str = typer.Option("mhr report", help="Heading of index.md."),
    ) -> None:
        """Write table.md/json, PNG plots and index.md; prints the index path."""
        from mhr.report import build_report

        c = context(ctx)
        ds = c.dataset()
        names = [run_name(r) for r in runs]
        index = build_report(ds, names, out or ds.reports_dir / names[0], split, fusion, title)
        err.print(index.with_name("table.md").read_text())
        emit(str(index))
