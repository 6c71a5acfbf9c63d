"""`mhr gc`: remove temporary files that killed processes left in the workspace."""

from __future__ import annotations

import typer

from mhr.cli.common import context
from mhr.console import emit, emit_json, err


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def register(app: typer.Typer) -> None:
    @app.command("gc")
    def gc_cmd(
        ctx: typer.Context,
        dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """Remove leftover temporary files of processes that are gone (a killed build or training).

        Only names with their writer's pid in them (.X.tmp-PID, .X.old-PID, .wal, spill folders) count,
        and only when that pid is not running: a live stage's files are never touched.

        Prints each path removed (with --dry-run: each that would be); `mhr status` lists them too.
        """
        from mhr.cache import remove_leftovers

        c = context(ctx)
        removed = remove_leftovers(c.workspace.root, dry_run=dry_run)
        if as_json:
            emit_json([{"path": str(x.path), "pid": x.pid, "size": x.size} for x in removed])
        else:
            for x in removed:
                emit(str(x.path))
        total = human_size(sum(x.size for x in removed))
        verb = "would remove" if dry_run else "removed"
        err.print(f"{verb} {len(removed)} leftover temporary file(s), {total}" if removed
                  else f"no leftover temporary files in {c.workspace.root}")
