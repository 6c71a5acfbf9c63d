"""The workspace at a glance (`mhr status`): per dataset its stage runs, windows and runs with their
state (done, damaged, stale, training, incomplete) and the temporary files of dead processes; a store
that cannot be read (damaged, busy, unreadable) is listed as such while the others are still shown."""

from __future__ import annotations

import json
import time
from typing import Any

from mhr.cache import read_manifest
from mhr.errors import BusyError, DamagedStoreError, DiskError, InputError, MhrError
from mhr.store import connect, get_meta, verify_store
from mhr.workspace import read_current


def _stage_rows(path) -> tuple[list[tuple], dict[str, str]]:
    """(the store's stage runs, the input keys its artifacts must match: {"data": …, "prior:NAME": …})."""
    con = connect(path, read_only=True)
    try:
        verify_store(con, path)  # damaged blocks make the store damaged, not its stages done
        rows = con.execute(
            "SELECT stage, key, epoch(started), seconds, status, params FROM stage_runs ORDER BY started"
        ).fetchall()
        keys = {f"prior:{name}": key for name, key in con.execute("SELECT prior, key FROM priors").fetchall()}
        keys["data"] = str(get_meta(con, "data_key") or "")
        return rows, keys
    finally:
        con.close()


def collect_status(workspace) -> list[dict[str, Any]]:
    """One record per dataset: its stage runs (from the store) and directory artifacts."""
    out = []
    for name in workspace.datasets():
        ds = workspace.dataset(name)
        record: dict[str, Any] = {"dataset": name, "stages": [], "artifacts": [], "current": read_current(ds)}
        try:
            rows, current = _stage_rows(ds.store_path)
        except MhrError as e:  # a damaged, foreign, busy or unreadable store is listed as such, the others still shown
            record["store_error"] = {"message": e.message, "hint": e.hint, "state": _store_state(e)}
            rows, current = [], None
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
        stale_windows: set[str] = set()
        for kind, folder in (("windows", ds.windows_dir), ("run", ds.runs_dir)):
            if not folder.is_dir():
                continue
            for d in sorted(folder.iterdir()):
                if d.name.startswith("."):
                    continue
                manifest = read_manifest(d, verify=True)  # checksums too: damaged is not done
                state = _state(kind, d, manifest)
                if state == "done" and _is_stale(manifest, current, stale_windows):
                    state = "stale"
                    stale_windows |= {manifest["key"]} if kind == "windows" else set()
                record["artifacts"].append(
                    {
                        "kind": kind,
                        "name": d.name,
                        "key": manifest and manifest["key"],
                        "complete": manifest is not None,
                        "state": state,
                        "age_s": time.time() - d.stat().st_mtime,
                    }
                )
        out.append(record)
    _attach_leftovers(workspace, out)
    return out


def _is_stale(manifest: dict[str, Any], current: dict[str, str] | None, stale_windows: set[str]) -> bool:
    """Built from inputs the store no longer holds: windows of another data version, a run of rebuilt
    (or removed) priors or of stale windows. Unknown (None) when the store cannot be read: not stale."""
    if current is None:
        return False
    for name, key in manifest.get("inputs", {}).items():
        if name == "windows" and key in stale_windows:
            return True
        if (name == "data" or name.startswith("prior:")) and current.get(name) != key:
            return True
    return False


def _store_state(e: MhrError) -> str:
    """What a store that cannot be listed is: damaged (or foreign), busy, or unreadable."""
    if isinstance(e, BusyError):
        return "busy"
    return "damaged" if isinstance(e, InputError) else "unreadable"


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


def fail_if_damaged(records: list[dict[str, Any]]) -> None:
    """After listing everything: a store that cannot be read makes `mhr status` fail (exit 2)."""
    bad = [r for r in records if r.get("store_error") and r["store_error"]["state"] != "busy"]
    if bad:
        first = bad[0]["store_error"]
        more = f" (and {len(bad) - 1} more dataset(s))" if len(bad) > 1 else ""
        cls = DamagedStoreError if first["state"] == "damaged" else DiskError
        raise cls(f"dataset {bad[0]['dataset']}: {first['message']}{more}", hint=first["hint"])
