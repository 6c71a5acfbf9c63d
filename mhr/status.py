"""The workspace at a glance (`mhr status`): per dataset its stage runs, windows and runs with their
state (done, damaged, training, incomplete) and the temporary files of dead processes."""

from __future__ import annotations

import json
import time
from typing import Any

from mhr.cache import read_manifest
from mhr.errors import InputError
from mhr.store import connect
from mhr.workspace import read_current


def _stage_rows(path) -> list[tuple]:
    con = connect(path, read_only=True)
    try:
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
