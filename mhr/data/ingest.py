"""From a normalized `Source` to a store: dense ids, chronological `pos`, cached and atomic.

Ids: users and items are numbered from 1 in the order of their raw ids — numeric ids in numeric
order, then any non-numeric ids in text order. That order depends only on the set of ids, not on
row order, so MovieLens keeps `item_id == movie id`, and re-exporting the same data in another row
order gives the same ids.

`pos` is the 0-based chronological order within a user, ties broken by the order of the source
rows (window function over `(ts, src)`); without timestamps the source order is the time order
and `ts = pos`.

Every data stage (import, fetch, synth) goes through `build_store`: the stage key is computed
first, a store with the same `meta.data_key` is a cache hit, otherwise the whole store is built in
a temporary file under the dataset's write lock and renamed into place, so a failed or killed
import leaves the previous dataset exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mhr.cache import stage_key
from mhr.console import err
from mhr.data import dense
from mhr.data.dense import normalise_ids
from mhr.data.source import ITEMS_SCHEMA, TS_INVALID, USERS_SCHEMA, Source, conform
from mhr.errors import BusyError, InputError, MhrError, UsageError
from mhr.store import connect, damaged_store_error, get_meta, new_store, record_stage_run, rollback, set_meta
from mhr.workspace import Dataset, writing

DEDUPE = ("keep", "drop")


@dataclass
class BuildResult:
    """What a data stage did: the key, whether it was a cache hit, and counts for the log."""

    dataset: Dataset
    key: str
    cached: bool
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"dataset:{self.dataset.name}"


def existing_key(dataset: Dataset) -> str | None:
    """The data key of the store already there, or None (no store, or one that is not readable)."""
    return existing_state(dataset)[0]


def existing_state(dataset: Dataset, quiet: bool = False) -> tuple[str | None, list[str]]:
    """The data key and prior names of the store already there; (None, []) when there is none or
    it cannot be read (it is replaced, with a warning). A store another process is writing is busy,
    not damaged: BusyError, and it is left alone."""
    if not dataset.exists():
        return None, []
    try:
        con = connect(dataset.store_path, read_only=True)
    except BusyError:
        raise
    except MhrError as e:
        if not quiet:
            err.print(f"[yellow]the existing {dataset.store_path} will be replaced: {e.message}[/]")
        return None, []
    try:
        priors = [r[0] for r in con.execute("SELECT prior FROM priors ORDER BY prior").fetchall()]
        return get_meta(con, "data_key"), priors
    except duckdb.Error as e:
        damaged = damaged_store_error(e, dataset.store_path)
        if damaged is None:
            raise
        if not quiet:
            err.print(f"[yellow]the existing {dataset.store_path} will be replaced: {damaged.message}[/]")
        return None, []
    finally:
        con.close()


# What a rebuilt store inherits from the one it replaces. LLM answers are keyed by their request and
# the stage history is a log, so both always carry over; priors only while the data key (hence every
# id) is unchanged — over different data they are dropped, and only with `discard_priors`.
CARRIED_TABLES = ("llm_cache", "stage_runs")
PRIOR_TABLES = ("priors", "prior_groups", "item_groups", "user_groups", "event_groups", "horizon_groups")


def _plan_carry(dataset: Dataset, key: str, discard_priors: bool) -> tuple[bool, bool]:
    """(carry anything, carry the priors) from the existing store; refuses to drop priors silently."""
    old_key, priors = existing_state(dataset, quiet=True)
    if old_key is None:
        return False, False
    if old_key == key or not priors:
        return True, bool(priors)
    if not discard_priors:
        shown = ", ".join(priors[:6]) + (f", … {len(priors) - 6} more" if len(priors) > 6 else "")
        raise UsageError(
            f"dataset {dataset.name} holds {len(priors)} prior(s) ({shown}) built from other data "
            f"(data key {old_key[:12]}, this import {key[:12]}); replacing the data would drop them",
            hint="pass --discard-priors to replace it anyway (the LLM answer cache and stage history are kept; "
                 "rebuild the priors with `mhr priors build`), or import under another --name",
        )
    err.print(f"[yellow]dropping {len(priors)} prior(s) of the previous data: {', '.join(priors)}[/]")
    return True, False


def _carry_over(con: duckdb.DuckDBPyConnection, old: Path, priors: bool) -> dict[str, int]:
    """Copy the carried tables (and the priors when `priors`) of the store at `old` into `con`'s;
    returns the counts kept, for the import report."""
    con.execute(f"ATTACH '{str(old).replace(chr(39), chr(39) * 2)}' AS old_store (READ_ONLY)")
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            for table in CARRIED_TABLES + (PRIOR_TABLES if priors else ()):
                con.execute(f"INSERT INTO {table} SELECT * FROM old_store.{table}")
            con.execute("COMMIT")
        except duckdb.Error as e:  # the old store is damaged where these tables lie: keep none of them
            rollback(con)
            damaged = damaged_store_error(e, old)
            if damaged is None:
                raise
            err.print(f"[yellow]nothing carried over from the previous store: {damaged.message}[/]")
        return {"priors_kept": con.execute("SELECT count(*) FROM priors").fetchall()[0][0],
                "llm_answers_kept": con.execute("SELECT count(*) FROM llm_cache").fetchall()[0][0]}
    finally:
        con.execute("DETACH old_store")


def build_store(
    dataset: Dataset,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    fill: Callable[[duckdb.DuckDBPyConnection], dict[str, Any]],
    *,
    source: str,
    has_timestamps: bool,
    force: bool = False,
    discard_priors: bool = False,
    run_params: dict[str, Any] | None = None,
) -> BuildResult:
    """Build `dataset`'s store with `fill(con)` unless one with the same key exists.

    `fill` writes items, users and interactions into the fresh store and returns a report
    (counts) kept in `meta.report`. Keyed by `stage_key("data", params, inputs)`. A rebuild
    (`force`, or other data) keeps the old store's LLM answer cache and stage history, and its
    priors when the key is unchanged; other data over a store with priors needs `discard_priors`.
    """
    key = stage_key("data", params, inputs)
    if not force and existing_key(dataset) == key:  # cached: no write lock needed, nor waited for
        return BuildResult(dataset, key, True)
    with writing(dataset, stage):
        if not force and existing_key(dataset) == key:
            return BuildResult(dataset, key, True)
        carry, carry_priors = _plan_carry(dataset, key, discard_priors)
        started = time.time()
        with new_store(dataset.store_path) as con:
            report = fill(con)
            if carry:
                report.update(_carry_over(con, dataset.store_path, carry_priors))
            set_meta(
                con,
                data_key=key,
                source=source,
                has_timestamps=has_timestamps,
                name=dataset.name,
                report=report,
            )
            record_stage_run(con, stage, key, {**params, **(run_params or {})}, inputs, started)
    return BuildResult(dataset, key, False, report)


def import_source(
    dataset: Dataset,
    read: Callable[[], Source],
    params: dict[str, Any],
    inputs: dict[str, str],
    *,
    stage: str = "data import",
    dedupe: str = "keep",
    min_history: int = 1,
    force: bool = False,
    discard_priors: bool = False,
    source_name: str | None = None,
    run_params: dict[str, Any] | None = None,
) -> BuildResult:
    """Read (only when not cached) and ingest a source; see `ingest` for what is checked."""
    if dedupe not in DEDUPE:
        raise UsageError(f"--dedupe must be keep or drop, not {dedupe!r}")
    if min_history < 1:
        raise UsageError(f"--min-history must be >= 1, not {min_history}")
    params = {**params, "dedupe": dedupe, "min_history": min_history}
    key = stage_key("data", params, inputs)
    if not force and existing_key(dataset) == key:
        return BuildResult(dataset, key, True)
    _plan_carry(dataset, key, discard_priors)  # refuse before a long read, not after it
    src = read()
    return build_store(
        dataset,
        stage,
        params,
        inputs,
        lambda con: ingest(con, src, dedupe=dedupe, min_history=min_history),
        source=source_name or src.name,
        has_timestamps=src.has_timestamps,
        force=True,
        discard_priors=discard_priors,
        run_params=run_params,
    )


def ingest(con: duckdb.DuckDBPyConnection, src: Source, dedupe: str = "keep", min_history: int = 1) -> dict[str, Any]:
    """Write `src` into the fresh store behind `con`; returns the counts of what was done.

    Raises InputError (naming the file and row) for missing user/item ids and for missing,
    unparseable or negative timestamps. Duplicated (user, item, ts) rows are counted and kept or
    dropped (first kept); users with fewer than `min_history` interactions are dropped and counted;
    item-table rows for items that never occur and interactions whose item has no metadata are
    counted, not errors.

    The fast path (`mhr.data.dense`: one hash pass per id column, one sort); `ingest_sql` is the
    reference it must agree with.
    """
    inter = src.interactions
    n_read = inter.num_rows
    if n_read == 0:
        raise InputError(f"{src.name}: no interactions", hint="give a file with at least one interaction row")
    with ThreadPoolExecutor(2) as pool:  # Arrow's hashing releases the GIL: both columns at once
        encoded = [pool.submit(dense.encode_ids, inter.column(name), src, name) for name in ("user", "item")]
        users, items = (f.result() for f in encoded)  # a bad user id is reported before a bad item id
    ts_col = inter.column("ts")
    ts_null = pc.is_null(ts_col).to_numpy(zero_copy_only=False) if ts_col.null_count else None
    ts = np.asarray(ts_col.fill_null(0).to_numpy(), np.int64)
    dense.check_rows(users, items, ts, ts_null, src)

    report: dict[str, Any] = {"rows_read": n_read}
    user_rank, item_rank = dense.rank_ids(con, users), dense.rank_ids(con, items)
    uid, iid = user_rank[users.codes], item_rank[items.codes]
    order = _kept_order(uid, iid, ts, src, dedupe, min_history, report)
    user_map = dense.dense_map(np.bincount(uid[order], minlength=len(user_rank) + 1) > 0)
    item_map = dense.dense_map(np.bincount(iid[order], minlength=len(item_rank) + 1) > 0)
    user_id = user_map[uid[order]]
    pos = dense.user_positions(user_id)
    rows = pa.table({
        "user_id": user_id, "item_id": item_map[iid[order]], "ts": ts[order] if src.has_timestamps else pos.astype(np.int64),
        "event": _take_text(inter.column("event"), order), "pos": pos,
    })
    del uid, iid, ts, order
    con.register("dense_rows", rows)
    con.execute("INSERT INTO interactions SELECT * FROM dense_rows")
    con.unregister("dense_rows")
    _id_table(con, "umap", users.values, user_rank, user_map)
    _id_table(con, "imap", items.values, item_rank, item_map)
    return _finish(con, src, report)


def _kept_order(uid: np.ndarray, iid: np.ndarray, ts: np.ndarray, src: Source, dedupe: str, min_history: int,
                report: dict[str, Any]) -> np.ndarray:
    """Rows in (user, ts, source row) order, less dropped duplicates and short users; counts both."""
    order = dense.chronological(uid, ts)
    dup_rows = dense.duplicates(order, uid, iid, ts) if src.has_timestamps else np.empty(0, np.int64)
    report["duplicates"] = dup = len(dup_rows)
    keep = None
    if dup and dedupe == "drop":
        keep = np.ones(len(uid), bool)
        keep[dup_rows] = False
    report["duplicates_dropped"] = dup if dedupe == "drop" else 0
    counts = np.bincount(uid if keep is None else uid[keep])
    short = (counts > 0) & (counts < min_history)
    short_users = int(short.sum())
    report["short_users_dropped"] = short_users
    report["short_user_rows_dropped"] = int(counts[short].sum())
    if short_users:
        keep = ~short[uid] if keep is None else keep & ~short[uid]
    if keep is not None:
        order = order[keep[order]]
    if len(order) == 0:
        raise InputError(
            f"{src.name}: no user has at least {min_history} interactions ({short_users} users dropped)",
            hint="lower --min-history",
        )
    return order


def _take_text(column: pa.ChunkedArray, order: np.ndarray) -> pa.Array:
    """`column[order]` for a low-cardinality text column (events): gathers codes, not strings."""
    if column.null_count == len(column):
        return pa.nulls(len(order), pa.string())
    enc = pc.dictionary_encode(column.combine_chunks())
    return pa.DictionaryArray.from_arrays(enc.indices.take(pa.array(order)), enc.dictionary)


def _id_table(con: duckdb.DuckDBPyConnection, table: str, values: pa.Array, rank: np.ndarray,
              id_map: np.ndarray) -> None:
    """The temp table (raw_id, id) `_write_items`/`_write_users` read: kept ids, renumbered."""
    by_rank = values.take(pa.array(np.argsort(rank)))  # raw id of old id 1, 2, …
    kept = id_map[1:] > id_map[:-1]
    con.register("id_rows", pa.table({"raw_id": by_rank.filter(pa.array(kept)),
                                      "id": np.arange(1, int(kept.sum()) + 1, dtype=np.int32)}))
    con.execute(f"CREATE TEMP TABLE {table} AS SELECT * FROM id_rows")
    con.unregister("id_rows")


def _finish(con: duckdb.DuckDBPyConnection, src: Source, report: dict[str, Any]) -> dict[str, Any]:
    """Items, users and the counts, once interactions, `umap` and `imap` are written."""
    report.update(_write_items(con, src))
    report.update(_write_users(con, src))
    for name in ("users", "items", "interactions"):
        report[name] = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]
    report["notes"] = list(src.notes)
    return report


def ingest_sql(con: duckdb.DuckDBPyConnection, src: Source, dedupe: str = "keep", min_history: int = 1) -> dict[str, Any]:
    """The reference for `ingest` (same store, same report): plain SQL over the text ids — a join
    per id column, a DISTINCT for duplicates, a window for `pos`. Kept for the tests.

    Raises InputError (naming the file and row) for missing user/item ids and for missing,
    unparseable or negative timestamps. Duplicated (user, item, ts) rows are counted and kept or
    dropped (first kept); users with fewer than `min_history` interactions are dropped and counted;
    item-table rows for items that never occur and interactions whose item has no metadata are
    counted, not errors.
    """
    inter = src.interactions
    n_read = inter.num_rows
    if n_read == 0:
        raise InputError(f"{src.name}: no interactions", hint="give a file with at least one interaction row")
    inter = _clean_ids(inter, src)
    inter = inter.append_column("src", pa.array(np.arange(n_read, dtype=np.int64)))
    con.register("raw", inter)  # scanned in place (zero-copy) until the integer table `j` exists
    _check_rows(con, src)

    report: dict[str, Any] = {"rows_read": n_read}
    # Provisional dense ids first, so duplicates, history lengths and pos are computed on
    # integers (several times faster than on the raw text ids); renumbered only if rows go.
    _number(con, "umap", '"user"')
    _number(con, "imap", "item")
    con.execute("""
        CREATE TEMP TABLE j AS SELECT u.id AS uid, i.id AS iid, r.ts, r.event, r.src
        FROM raw r JOIN umap u ON r."user" = u.raw_id JOIN imap i ON r.item = i.raw_id
    """)
    con.unregister("raw")
    del inter
    dup = 0
    if src.has_timestamps:
        dup = con.execute(
            "SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT uid, iid, ts FROM j)) FROM j"
        ).fetchall()[0][0]
    report["duplicates"] = dup
    if dup and dedupe == "drop":
        con.execute(
            "DELETE FROM j WHERE src IN (SELECT src FROM j QUALIFY "
            "row_number() OVER (PARTITION BY uid, iid, ts ORDER BY src) > 1)"
        )
    report["duplicates_dropped"] = dup if dedupe == "drop" else 0

    short_users, short_rows = con.execute(
        "SELECT count(*), coalesce(sum(n), 0) FROM (SELECT count(*) n FROM j GROUP BY uid) WHERE n < ?",
        [min_history],
    ).fetchall()[0]
    if short_users:
        con.execute("DELETE FROM j WHERE uid IN (SELECT uid FROM j GROUP BY uid HAVING count(*) < ?)", [min_history])
    report["short_users_dropped"] = int(short_users)
    report["short_user_rows_dropped"] = int(short_rows)
    if con.execute("SELECT count(*) FROM j").fetchall()[0][0] == 0:
        raise InputError(
            f"{src.name}: no user has at least {min_history} interactions ({short_users} users dropped)",
            hint="lower --min-history",
        )
    if short_users or (dup and dedupe == "drop"):
        _renumber(con, "umap", "uid")
        _renumber(con, "imap", "iid")

    ts_col = "ts" if src.has_timestamps else "pos"
    con.execute(f"""
        INSERT INTO interactions
        SELECT uid, iid, {ts_col}, event, pos FROM (
            SELECT uid, iid, ts, event,
                   CAST(row_number() OVER (PARTITION BY uid ORDER BY ts, src) - 1 AS INTEGER) AS pos FROM j)
    """)
    con.execute("DROP TABLE j")
    return _finish(con, src, report)


def _clean_ids(inter: pa.Table, src: Source) -> pa.Table:
    """Normalised user and item ids; an id holding a control character (NUL, tab, …) is an error
    naming its row: it would print as something else and never match the item table."""
    for name in ("user", "item"):
        ids = normalise_ids(inter.column(name))
        if not pc.all(pc.ascii_is_printable(ids)).as_py():  # cheap test first; non-ASCII takes the slow one
            bad = pc.match_substring_regex(ids, r"[\x00-\x1f\x7f]")
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                raise InputError(
                    f"{src.locate(i)}: {name} id {ids[i].as_py()!r} holds a control character "
                    f"(column {src.columns.get(name, name)!r})",
                    hint="remove NUL, tab and other control bytes from the ids (or fix the delimiter)",
                )
        inter = inter.set_column(inter.schema.get_field_index(name), name, ids)
    return inter


def _check_rows(con: duckdb.DuckDBPyConnection, src: Source) -> None:
    """Missing ids and bad timestamps are errors naming the first offending row."""
    cols = src.columns
    checks = [
        ("\"user\" IS NULL OR \"user\" = ''", f"empty user id (column {cols.get('user', 'user')!r})"),
        ("item IS NULL OR item = ''", f"empty item id (column {cols.get('item', 'item')!r})"),
    ]
    if src.has_timestamps:
        tcol = cols.get("ts", "ts")
        checks += [
            ("ts IS NULL", f"missing timestamp (column {tcol!r})"),
            (f"ts = {TS_INVALID}", f"timestamp is not a number or ISO date, or is NaN, infinite or out of range "
                                   f"(column {tcol!r})"),
            ("ts < 0", f"negative timestamp: before 1970-01-01 (column {tcol!r})"),
        ]
    where = " OR ".join(f"({c})" for c, _ in checks)
    row = con.execute(f"SELECT min(src) FROM raw WHERE {where}").fetchall()[0][0]
    if row is None:
        return
    values = con.execute(f"SELECT {', '.join(f'({c})' for c, _ in checks)} FROM raw WHERE src = ?", [row]).fetchall()[0]
    what = next(m for (_, m), bad in zip(checks, values, strict=True) if bad)
    ts_hint = "fix or remove the row; timestamps must be non-negative numbers (epoch seconds) or ISO dates"
    raise InputError(f"{src.locate(row)}: {what}", hint=ts_hint if "timestamp" in what else "fix or remove the row")


def _number(con: duckdb.DuckDBPyConnection, table: str, column: str) -> None:
    """Dense ids from 1 in raw-id order: numeric ids numerically first, then the rest as text."""
    con.execute(f"""
        CREATE TEMP TABLE {table} AS
        SELECT raw_id, CAST(row_number() OVER (ORDER BY TRY_CAST(raw_id AS HUGEINT) NULLS LAST, raw_id) AS INTEGER) AS id
        FROM (SELECT DISTINCT {column} AS raw_id FROM raw)
    """)


def _renumber(con: duckdb.DuckDBPyConnection, table: str, column: str) -> None:
    """Close the gaps left by dropped users/items: ids stay dense, in the same relative order."""
    con.execute(f"""
        CREATE TEMP TABLE remap AS
        SELECT id AS old, CAST(row_number() OVER (ORDER BY id) AS INTEGER) AS new
        FROM {table} WHERE id IN (SELECT DISTINCT {column} FROM j)
    """)
    con.execute(f"UPDATE j SET {column} = remap.new FROM remap WHERE j.{column} = remap.old")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        SELECT t.raw_id, r.new AS id FROM {table} t JOIN remap r ON t.id = r.old
    """)
    con.execute("DROP TABLE remap")


def _write_items(con: duckdb.DuckDBPyConnection, src: Source) -> dict[str, Any]:
    if src.items is None:
        con.execute("INSERT INTO items SELECT id, raw_id, NULL, NULL, []::VARCHAR[], '{}' FROM imap ORDER BY id")
        return {}
    items = conform(src.items, ITEMS_SCHEMA)
    con.register("src_items", items.set_column(0, "raw_id", normalise_ids(items.column("raw_id"))))
    con.execute("CREATE TEMP TABLE meta_items AS SELECT * FROM src_items QUALIFY row_number() OVER (PARTITION BY raw_id) = 1")
    dup = src.items.num_rows - con.execute("SELECT count(*) FROM meta_items").fetchall()[0][0]
    con.unregister("src_items")
    con.execute("""
        INSERT INTO items
        SELECT m.id, m.raw_id, it.title, it.text, coalesce(it.tags, []::VARCHAR[]), coalesce(it.attrs, '{}')
        FROM imap m LEFT JOIN meta_items it ON it.raw_id = m.raw_id ORDER BY m.id
    """)
    unused, missing = con.execute("""
        SELECT (SELECT count(*) FROM meta_items WHERE raw_id NOT IN (SELECT raw_id FROM imap)),
               (SELECT count(*) FROM imap WHERE raw_id NOT IN (SELECT raw_id FROM meta_items))
    """).fetchall()[0]
    con.execute("DROP TABLE meta_items")
    return {"item_rows_duplicated": dup, "items_never_interacted": unused, "items_without_metadata": missing}


def _write_users(con: duckdb.DuckDBPyConnection, src: Source) -> dict[str, Any]:
    if src.users is None:
        con.execute("INSERT INTO users SELECT id, raw_id, '{}' FROM umap ORDER BY id")
        return {}
    users = conform(src.users, USERS_SCHEMA)
    con.register("src_users", users.set_column(0, "raw_id", normalise_ids(users.column("raw_id"))))
    con.execute("""
        INSERT INTO users
        SELECT m.id, m.raw_id, coalesce(u.attrs, '{}')
        FROM umap m LEFT JOIN (SELECT * FROM src_users QUALIFY row_number() OVER (PARTITION BY raw_id) = 1) u
          ON u.raw_id = m.raw_id ORDER BY m.id
    """)
    unused, missing = con.execute("""
        SELECT (SELECT count(DISTINCT raw_id) FROM src_users WHERE raw_id NOT IN (SELECT raw_id FROM umap)),
               (SELECT count(*) FROM umap WHERE raw_id NOT IN (SELECT raw_id FROM src_users))
    """).fetchall()[0]
    con.unregister("src_users")
    return {"users_never_interacted": unused, "users_without_metadata": missing}
