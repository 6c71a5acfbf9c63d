"""`mhr status`: datasets, stages with keys and ages, runs."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.table import Table

from mhr.cli.common import context
from mhr.console import emit_json, err
from mhr.status import collect_status, fail_if_damaged


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _print_leftovers(leftovers: list[dict[str, Any]]) -> None:
    if not leftovers:
        return
    from mhr.cli.gc import human_size

    table = Table(title="leftover temporary files of dead processes (`mhr gc` removes them)",
                  title_justify="left")
    for col in ("path", "pid", "size"):
        table.add_column(col)
    for x in leftovers:
        table.add_row(x["path"], str(x["pid"]), human_size(x["size"]))
    err.print(table)


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status(
        ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")
    ) -> None:
        """Show datasets, the stages run on each (keys, ages) and the artifacts and runs they hold."""
        c = context(ctx)
        records = collect_status(c.workspace)
        if as_json:
            emit_json(records)
            fail_if_damaged(records)
            return
        if not any(r["dataset"] for r in records):
            err.print(f"no datasets in {c.workspace.root} — start with `mhr data fetch movielens-100k`")
        now = time.time()
        for rec in records:
            if rec["dataset"] is None:
                continue
            table = Table(title=f"dataset {rec['dataset']}", title_justify="left")
            for col in ("kind", "name / stage", "key", "age", "status"):
                table.add_column(col)
            for s in rec["stages"]:
                table.add_row("stage", s["stage"], s["key"][:12], _age(now - s["started"]), s["status"])
            if rec.get("store_error"):
                state = rec["store_error"]["state"]
                table.add_row("store", "store.duckdb", "", "", f"[{'yellow' if state == 'busy' else 'red'}]{state}[/]")
                err.print(f"[dim]{rec['dataset']}: {rec['store_error']['message']}[/]", soft_wrap=True)
            for a in rec["artifacts"]:
                table.add_row(
                    a["kind"],
                    a["name"],
                    (a["key"] or "")[:12],
                    _age(a["age_s"]),
                    {"done": "done", "damaged": "[red]damaged[/]", "stale": "[red]stale[/]"}.get(
                        a["state"], f"[yellow]{a['state']}[/]"),
                )
            err.print(table)
            cur = rec["current"]
            err.print(f"current (used when none is named): windows "
                      f"{'windows:' + cur['windows'][:12] if cur.get('windows') else '—'}, "
                      f"run {cur.get('run') or '—'}")
        _print_leftovers([x for r in records for x in r["leftovers"]])
        fail_if_damaged(records)
