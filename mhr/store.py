"""The dataset store: one DuckDB file per dataset with the tables of DESIGN §4.

Ids are dense: items and users are numbered from 1 (0 is padding). `interactions.pos` is the
chronological order within a user, ties broken by the order in the source.

A new store is always built in a temporary file and renamed into place (`new_store`), so a failed
import never leaves a half-created dataset and never damages the one already there. Stages that
add to an existing store (priors) do so inside one transaction.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from mhr.errors import InputError, NotFoundError

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


def connect(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open an existing store, refusing files that are not an mhr DuckDB store."""
    if not path.is_file():
        raise NotFoundError(f"no store at {path}", hint="create the dataset first with `mhr data …`")
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as e:
        text = str(e)
        if "lock" in text.lower():
            from mhr.errors import BusyError

            raise BusyError(
                f"busy: another process is writing {path.parent.name}",
                hint="wait for it to finish and run this again",
            ) from None
        raise InputError(
            f"{path} is not a DuckDB store ({text.splitlines()[0]})",
            hint="remove the file and re-create the dataset with `mhr data …`",
        ) from None
    except duckdb.Error as e:
        raise InputError(
            f"{path} is not a DuckDB store ({str(e).splitlines()[0]})",
            hint="remove the file and re-create the dataset with `mhr data …`",
        ) from None
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except duckdb.Error:
        con.close()
        raise InputError(
            f"{path} is a DuckDB file but not an mhr store (no meta table)",
            hint="re-create the dataset with `mhr data …`",
        ) from None
    if row is None or int(row[0]) != SCHEMA_VERSION:
        con.close()
        raise InputError(
            f"{path} has store schema {row and row[0]}, this mhr reads {SCHEMA_VERSION}",
            hint="re-create the dataset with `mhr data …`",
        )
    return con


@contextmanager
def new_store(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Build a fresh store in a temporary file; rename it over `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute(SCHEMA)
        set_meta(con, schema_version=SCHEMA_VERSION)
        yield con
        con.execute("CHECKPOINT")
        con.close()
        os.replace(tmp, path)
    except BaseException:
        con.close()
        raise
    finally:
        for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
            stale.unlink(missing_ok=True)


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
