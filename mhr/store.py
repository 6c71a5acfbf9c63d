"""The dataset store: one DuckDB file per dataset with the tables of `SCHEMA` (described in
docs/ARCHITECTURE.md, "The store").

Ids are dense: items and users are numbered from 1 (0 is padding). `interactions.pos` is the
chronological order within a user, ties broken by the order in the source.

A new store is always built in a temporary file and renamed into place (`new_store`), so a failed
import never leaves a half-created dataset and never damages the one already there. Stages that
add to an existing store (priors) do so inside one transaction.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from mhr.errors import (
    BusyError,
    DamagedStoreError,
    DiskError,
    InputError,
    MhrError,
    NotFoundError,
    UsageError,
)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS items(
    item_id INTEGER PRIMARY KEY, raw_id VARCHAR UNIQUE NOT NULL,
    title VARCHAR, text VARCHAR, tags VARCHAR[], attrs VARCHAR);
CREATE TABLE IF NOT EXISTS users(
    user_id INTEGER PRIMARY KEY, raw_id VARCHAR UNIQUE NOT NULL, attrs VARCHAR);
CREATE TABLE IF NOT EXISTS interactions(
    user_id INTEGER NOT NULL, item_id INTEGER NOT NULL, ts BIGINT NOT NULL,
    event VARCHAR, pos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS priors(
    prior VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, params VARCHAR, key VARCHAR NOT NULL,
    report VARCHAR, created TIMESTAMP);
CREATE TABLE IF NOT EXISTS prior_groups(
    prior VARCHAR, group_id INTEGER, name VARCHAR, PRIMARY KEY(prior, group_id));
CREATE TABLE IF NOT EXISTS item_groups(prior VARCHAR, item_id INTEGER, group_id INTEGER);
CREATE TABLE IF NOT EXISTS user_groups(prior VARCHAR, user_id INTEGER, group_id INTEGER);
CREATE TABLE IF NOT EXISTS event_groups(prior VARCHAR, event VARCHAR, group_id INTEGER);
CREATE TABLE IF NOT EXISTS horizon_groups(prior VARCHAR, "offset" INTEGER, group_id INTEGER);
CREATE TABLE IF NOT EXISTS llm_cache(
    key VARCHAR PRIMARY KEY, model VARCHAR, request VARCHAR, response VARCHAR, created TIMESTAMP);
CREATE TABLE IF NOT EXISTS stage_runs(
    stage VARCHAR, key VARCHAR, params VARCHAR, inputs VARCHAR, started TIMESTAMP,
    seconds DOUBLE, status VARCHAR);
"""


REBUILD_HINT = ("rebuild it: rerun the `mhr data fetch|import|synth` command that made it with --force, "
                "then `mhr priors build` for its priors")
_DAMAGE_MARKERS = ("Could not read enough bytes", "Corrupt database file", "does not match stored checksum")
_HEADER_BYTES = 3 * 4096  # DuckDB's file header and its two database headers, before the first block
_MAGIC = b"DUCK"


def is_duckdb_file(path: Path) -> bool:
    """The file starts with DuckDB's header (magic bytes at offset 8), whatever state the rest is in."""
    try:
        with open(path, "rb") as f:
            return f.read(12)[8:12] == _MAGIC
    except OSError:
        return False


def damaged_store_error(e: BaseException, path: Path | None = None,
                        fallback: Path | None = None) -> DamagedStoreError | None:
    """A DuckDB error that means a store file is truncated or corrupt, as a one-line error; else None.
    The file named is `path`, else the one the message quotes, else `fallback` (the dataset the
    command works on: DuckDB's checksum errors name no file)."""
    text = str(e)
    if not any(m in text for m in _DAMAGE_MARKERS):
        return None
    where = str(path or _quoted_path(text) or fallback or "the dataset store")
    return DamagedStoreError(f"{where} is damaged (truncated or corrupt: {text.strip().splitlines()[0]})",
                             hint=REBUILD_HINT)


def _quoted_path(text: str) -> str | None:
    start = text.find('file "')
    if start < 0:
        return None
    end = text.find('"', start + 6)
    return text[start + 6:end] if end > start else None


# characters DuckDB does not read literally in a database path: `?` starts its options
# ("file.duckdb?x=1"), a backslash is taken for a folder separator
_DUCKDB_SPECIAL = ("?", "\\")


def check_store_folder(path: Path, what: str = "the workspace") -> Path:
    """`path` unless it holds a character DuckDB would not read literally in a store's path: then a
    UsageError (exit 2) naming it, before anything is written (every store write would fail)."""
    bad = [c for c in _DUCKDB_SPECIAL if c in str(path)]
    if bad:
        raise UsageError(f"{what} {path} contains '{bad[0]}', which DuckDB does not read literally in a "
                         "database path", hint="use a folder whose path has no '?' or backslash "
                         "(--workspace / MHR_WORKSPACE)")
    return path


def connect(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open an existing store, refusing files that are not an mhr DuckDB store or are damaged.

    Cheap integrity check on every open: the file must be as long as its header says (a store
    truncated mid-file otherwise opens and fails later, mid-command) and `meta` must be readable.
    """
    if not path.is_file():
        raise NotFoundError(f"no store at {path}", hint="create the dataset first with `mhr data …`")
    check_store_folder(path.parent)
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as e:
        raise _open_error(path, e, read_only) from None
    try:
        _check_length(con, path)
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except DamagedStoreError:
        con.close()
        raise
    except duckdb.CatalogException:
        con.close()
        raise InputError(
            f"{path} is a DuckDB file but not an mhr store (no meta table)",
            hint="re-create the dataset with `mhr data …`",
        ) from None
    except duckdb.Error as e:
        con.close()
        raise damaged_store_error(e, path) or DamagedStoreError(
            f"{path} is damaged (cannot read its meta table: {str(e).strip().splitlines()[0]})", hint=REBUILD_HINT
        ) from None
    if row is None or int(row[0]) != SCHEMA_VERSION:
        con.close()
        raise InputError(
            f"{path} has store schema {row and row[0]}, this mhr reads {SCHEMA_VERSION}",
            hint="re-create the dataset with `mhr data …`",
        )
    return con


def _open_error(path: Path, e: duckdb.Error, read_only: bool) -> MhrError:
    text = str(e)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if "lock" in text.lower():
        pid = re.search(r"\(PID (\d+)\)", text)  # DuckDB names the process holding the file
        stage = _stage_writing(path)  # the command, as the dataset's write lock names it
        holder = stage or (f"process {pid.group(1)}" if pid else "another process")
        return BusyError(f"busy: {holder} is writing {path.parent.name}; its store cannot be read until it is done",
                         hint="wait for it to finish and run this again",
                         holder=holder, pid=int(pid.group(1)) if pid else None)
    if "Permission denied" in text or "Read-only file system" in text:
        what = "read" if read_only else "open for writing"
        fix = ("make the file readable (chmod u+r)" if read_only else
               "make the file and its folder writable (chmod u+w)")
        return DiskError(f"cannot {what} {path}: permission denied",
                         hint=f"{fix} or run as their owner; the store itself is fine")
    damaged = damaged_store_error(e, path)
    if damaged is not None or is_duckdb_file(path):
        return damaged or DamagedStoreError(f"{path} is damaged ({first})", hint=REBUILD_HINT)
    return InputError(f"{path} is not a DuckDB store ({first})",
                      hint="remove the file and re-create the dataset with `mhr data …`")


def verify_store(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Read every row of every table, so that DuckDB checks the checksum of every block in use: a
    store whose bytes were damaged in place (size intact) raises DamagedStoreError here rather than
    midway through a later command. A full scan, so kept for `mhr status` (about 0.3 s per 20M rows)."""
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                         "current_database() ORDER BY 1").fetchall()]
    for t in tables:
        try:
            con.execute(f'SELECT count(*), sum(hash(t)) FROM "{t}" t').fetchall()
        except duckdb.Error as e:
            raise damaged_store_error(e, path) or DamagedStoreError(
                f"{path} is damaged (table {t} cannot be read: {str(e).strip().splitlines()[0]})",
                hint=REBUILD_HINT) from None


def _stage_writing(path: Path) -> str | None:
    """Who holds the dataset's write lock (`mhr.workspace.writing`), e.g. "priors build (pid 12)"."""
    from mhr.cache import lock_holder

    return lock_holder(path.parent / ".lock")


def _check_length(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A file shorter than its last data block lost its tail (a copy cut short, a full disk).

    The blocks the tables use come from the storage metadata (no data is read); DuckDB trims free
    blocks off the end of the file, so the header's block count is no bound."""
    if path.with_name(path.name + ".wal").exists():
        return  # blocks of an unreplayed log may not be on disk yet
    size = con.execute("SELECT block_size FROM pragma_database_size() LIMIT 1").fetchone()
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                         "current_database()").fetchall()]
    if not size or not size[0] or not tables:
        return
    blocks = " UNION ALL ".join(
        f"SELECT block_id, additional_block_ids FROM pragma_storage_info('{t}') WHERE persistent" for t in tables)
    last = con.execute(
        f"SELECT max(greatest(block_id, coalesce(list_max(additional_block_ids), -1))) FROM ({blocks})"
    ).fetchone()[0]
    if last is None:
        return
    expected = _HEADER_BYTES + (int(last) + 1) * int(size[0])
    actual = path.stat().st_size
    if actual < expected:
        raise DamagedStoreError(
            f"{path} is damaged (truncated: {actual:,} bytes, its data reaches byte {expected:,})", hint=REBUILD_HINT)


@contextmanager
def new_store(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Build a fresh store in a temporary file; rename it over `path` only if the block succeeds."""
    check_store_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    con = None
    try:  # the connect too: an interrupt while it creates the file must not leave the file behind
        con = duckdb.connect(str(tmp))
        con.execute(SCHEMA)
        set_meta(con, schema_version=SCHEMA_VERSION)
        yield con
        con.execute("CHECKPOINT")
        con.close()
        os.replace(tmp, path)
    except BaseException:
        if con is not None:
            con.close()
        raise
    finally:
        for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
            stale.unlink(missing_ok=True)


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction, if there still is one: a COMMIT the disk refused has already
    ended it, and a second error ("no transaction is active") must not hide the first."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def set_meta(con: duckdb.DuckDBPyConnection, **values: Any) -> None:
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, text])


def get_meta(con: duckdb.DuckDBPyConnection, key: str, default: Any = None) -> Any:
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    if row is None:
        return default
    try:
        return json.loads(row[0])
    except json.JSONDecodeError:
        return row[0]


def data_key(con: duckdb.DuckDBPyConnection) -> str:
    """The stage key of the import that made this store: every later stage's input key."""
    key = get_meta(con, "data_key")
    if not key:
        raise InputError("store has no data_key in its meta table", hint="re-create the dataset")
    return str(key)


def record_stage_run(
    con: duckdb.DuckDBPyConnection,
    stage: str,
    key: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    started: float,
    status: str = "done",
) -> None:
    con.execute(
        "INSERT INTO stage_runs VALUES (?, ?, ?, ?, to_timestamp(?), ?, ?)",
        [
            stage,
            key,
            json.dumps(params, sort_keys=True, default=str),
            json.dumps(inputs, sort_keys=True),
            started,
            time.time() - started,
            status,
        ],
    )
