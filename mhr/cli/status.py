"""`mhr status`: datasets, stages with keys and ages, runs."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table

from mhr.cache import read_manifest
from mhr.cli.common import context
from mhr.console import emit_json, err
from mhr.errors import DamagedStoreError, InputError
from mhr.store import connect, verify_store
from mhr.workspace import read_current


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _stage_rows(path) -> list[tuple]:
    con = connect(path, read_only=True)
    try:
        verify_store(con, path)  # damaged blocks make the store damaged, not its stages done
        return con.execute(
            "SELECT stage, key, epoch(started), seconds, status, params FROM stage_runs ORDER BY started"
        ).fetchall()
    finally:
        con.close()


def collect_status(workspace) -> list[dict[str, Any]]:
    """One record per dataset: its stage runs (from the store) and directory artifacts."""
    out = []
    for name in workspace.datasets():
        ds = workspace.dataset(name)
        record: dict[str, Any] = {"dataset": name, "stages": [], "artifacts": [], "current": read_current(ds)}
        try:
            rows = _stage_rows(ds.store_path)
        except InputError as e:  # a damaged or foreign store is listed as such, the others still shown
            record["store_error"] = {"message": e.message, "hint": e.hint}
            rows = []
        for stage, key, started, seconds, status, params in rows:
            record["stages"].append(
                {
                    "stage": stage,
                    "key": key,
                    "started": started,
                    "seconds": seconds,
                    "status": status,
                    "params": json.loads(params or "{}"),
                }
            )
        for kind, folder in (("windows", ds.windows_dir), ("run", ds.runs_dir)):
            if not folder.is_dir():
                continue
            for d in sorted(folder.iterdir()):
                if d.name.startswith("."):
                    continue
                manifest = read_manifest(d, verify=True)  # checksums too: damaged is not done
                record["artifacts"].append(
                    {
                        "kind": kind,
                        "name": d.name,
                        "key": manifest and manifest["key"],
                        "complete": manifest is not None,
                        "state": _state(kind, d, manifest),
                        "age_s": time.time() - d.stat().st_mtime,
                    }
                )
        out.append(record)
    _attach_leftovers(workspace, out)
    return out


def _state(kind: str, d, manifest) -> str:
    """done, damaged (a manifest whose files fail their size or sha256), training (pid …) or incomplete."""
    from mhr.cache import MANIFEST, lock_holder, lock_path

    if manifest is not None:
        return "done"
    holder = lock_holder(lock_path(d)) if kind == "run" else None
    if holder:
        return f"training: {holder}"
    return "damaged" if (d / MANIFEST).is_file() else "incomplete"


def _attach_leftovers(workspace, records: list[dict[str, Any]]) -> None:
    """Temp files of dead processes (`mhr gc` removes them), each under its dataset's record; those
    in a folder with no store yet (a first import killed) under a record with dataset None."""
    from mhr.cache import find_leftovers

    by_name = {r["dataset"]: r for r in records}
    for r in records:
        r["leftovers"] = []
    for x in find_leftovers(workspace.root) if workspace.root.is_dir() else []:
        top = x.path.relative_to(workspace.root).parts[0]
        if top not in by_name:
            by_name[top] = {"dataset": None, "folder": top, "leftovers": []}
            records.append(by_name[top])
        by_name[top]["leftovers"].append({"path": str(x.path), "pid": x.pid, "size": x.size})


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
            _fail_if_damaged(records)
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
                table.add_row("store", "store.duckdb", "", "", "[red]damaged[/]")
            for a in rec["artifacts"]:
                table.add_row(
                    a["kind"],
                    a["name"],
                    (a["key"] or "")[:12],
                    _age(a["age_s"]),
                    {"done": "done", "damaged": "[red]damaged[/]"}.get(a["state"], f"[yellow]{a['state']}[/]"),
                )
            err.print(table)
            cur = rec["current"]
            err.print(f"current (used when none is named): windows "
                      f"{'windows:' + cur['windows'][:12] if cur.get('windows') else '—'}, "
                      f"run {cur.get('run') or '—'}")
        _print_leftovers([x for r in records for x in r["leftovers"]])
        _fail_if_damaged(records)


def _fail_if_damaged(records: list[dict[str, Any]]) -> None:
    """After listing everything: a store that cannot be read makes `mhr status` fail (exit 2)."""
    bad = [r for r in records if r.get("store_error")]
    if bad:
        first = bad[0]["store_error"]
        more = f" (and {len(bad) - 1} more dataset(s))" if len(bad) > 1 else ""
        raise DamagedStoreError(f"dataset {bad[0]['dataset']}: {first['message']}{more}", hint=first["hint"])
