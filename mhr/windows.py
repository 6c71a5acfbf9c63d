"""Training windows and the valid/test split, as a cached stage `windows/<key12>/`.

Per user, in `pos` order, with `n` interactions, horizon τ and holdout H (default H = τ): the last
H are the test targets, the H before them the validation targets, and the first `m = n - 2H` (the
training period) are cut into training windows of horizon τ. Users with fewer than `2H + 2`
interactions (fewer than two training items) are left out and counted. H > τ (`--holdout`) trains
at one horizon and evaluates at longer ones (paper Table 7: train τ = 4, evaluate at 1, 4, 8 with
H = 8); the stage parameters carry "holdout" only when H ≠ τ, so windows built without it keep
their keys.

Training windows are contiguous slices of length ≤ T + τ, anchored at the end of the training
period and stepping back by T: window k covers positions `[m - kT - T - τ, m - kT)` (clipped at 0),
so consecutive windows overlap by τ items and their *input* positions (the first T of a full
window) tile the training period up to `m - τ`. A slice needs ≥ 2 items, and stepping stops once a
window reaches position 0 (a further one would lie inside it). The earliest window, clipped at 0,
uses inputs `0 .. min(T, len-1) - 1` like any other, so up to τ - 1 of its last inputs repeat
inputs of the next window with a shorter horizon. The consumer builds targets with
`horizon_targets`: input position t predicts `items[t+1 : t+1+τ]`.

Valid/test rows hold the last ≤ T interactions before their targets, the H targets, and the whole
history before the targets (test history includes the validation targets).

The slicing runs in DuckDB (window index computed per interaction, then a grouped ordered list
aggregate), streamed as Arrow batches into Parquet with fixed row groups, so memory stays bounded
and the same store gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.table import Table

from mhr.cache import MANIFEST, build_artifact, is_done, read_manifest, stage_key
from mhr.console import err
from mhr.errors import BusyError, InputError, NotFoundError, StaleError, UsageError
from mhr.options import option
from mhr.store import connect, data_key, record_stage_run
from mhr.workspace import Dataset, read_current, record_current, writing

STAGE = "windows"
WINDOWS_FORMAT = 1
PROTOCOLS = ("paper", "loo")
DEFAULT_CONTEXT = 50
DEFAULT_HORIZON = 8
SPLITS = ("train", "valid", "test")
EVENTS_FILE = "events.json"
ROW_GROUP = 8192
_BATCH = 16384

TRAIN_SCHEMA = pa.schema(
    [
        ("user_id", pa.int32()),
        ("items", pa.list_(pa.int32())),
        ("ts", pa.list_(pa.int64())),
        ("events", pa.list_(pa.int16())),
    ]
)
EVAL_SCHEMA = pa.schema(
    [
        *TRAIN_SCHEMA,
        ("targets", pa.list_(pa.int32())),
        ("target_ts", pa.list_(pa.int64())),
        ("target_events", pa.list_(pa.int16())),
        ("history", pa.list_(pa.int32())),
    ]
)


# ---------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class WindowsParams:
    """`mhr windows build`'s options, declared once (the flags, their help and the logged command)."""

    context: int = option(DEFAULT_CONTEXT, "Context length T (input positions per window).", aliases=("-T",))
    horizon: int | None = option(None, f"Forecast horizon τ (not set: {DEFAULT_HORIZON}; 1 with --protocol loo).")
    protocol: str = option("paper", "paper (last τ test, τ before valid) or loo (leave-one-out, τ = 1).")
    holdout: int | None = option(
        None, "Held-out targets H ≥ τ per user: the last H are test, the H before them valid; training windows "
        "(horizon τ) come from the rest, so `mhr eval --horizons` may go up to H (not set: τ).")


def window_params(context: int = DEFAULT_CONTEXT, horizon: int | None = None, protocol: str = "paper",
                  holdout: int | None = None) -> dict:
    """The stage's parameters, checked: `loo` means τ = H = 1 (horizon None → 8 for paper, 1 for
    loo); holdout None → H = τ. H ≥ τ is required; "holdout" is a parameter only when H ≠ τ, so the
    keys of windows built before `--holdout` existed do not change."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}", hint=f"use one of: {', '.join(PROTOCOLS)}")
    if protocol == "loo":
        if horizon not in (None, 1):
            raise UsageError(
                f"--protocol loo is leave-one-out (τ = 1), got --horizon {horizon}",
                hint="drop --horizon, or use --protocol paper for a longer horizon",
            )
        if holdout not in (None, 1):
            raise UsageError(
                f"--protocol loo holds out one interaction per split, got --holdout {holdout}",
                hint="drop --holdout, or use --protocol paper to hold out more",
            )
        horizon = 1
    horizon = DEFAULT_HORIZON if horizon is None else int(horizon)
    if int(context) < 1:
        raise UsageError(f"--context must be ≥ 1, got {context}")
    if horizon < 1:
        raise UsageError(f"--horizon must be ≥ 1, got {horizon}")
    holdout = horizon if holdout is None else int(holdout)
    if holdout < horizon:
        raise UsageError(
            f"--holdout {holdout} is shorter than the training horizon τ = {horizon}",
            hint=f"pass --holdout ≥ {horizon} (or leave it out: H = τ)",
        )
    params = {"context": int(context), "horizon": horizon, "protocol": protocol, "format": WINDOWS_FORMAT}
    if holdout != horizon:
        params["holdout"] = holdout
    return params


def holdout_of(params: dict[str, Any]) -> int:
    """H, the held-out targets per user and split, of a windows artifact's parameters (τ unless set)."""
    return int(params.get("holdout", params["horizon"]))


# ---------------------------------------------------------------------------------------------
# building


def build_windows(
    dataset: Dataset,
    context: int = DEFAULT_CONTEXT,
    horizon: int | None = None,
    protocol: str = "paper",
    force: bool = False,
    holdout: int | None = None,
) -> tuple[str, Path, bool]:
    """Build (or find cached) windows for the dataset's current store; returns (key, path, cached).

    `holdout` H (default τ): valid/test targets are the H interactions before the last H and the last
    H; training windows (horizon τ) come from everything before them."""
    dataset.require()
    params = window_params(context, horizon, protocol, holdout)
    con = connect(dataset.store_path, read_only=True)
    try:
        inputs = {"data": data_key(con)}
    finally:
        con.close()
    key = stage_key(STAGE, params, inputs)
    final = dataset.windows_dir / key[:12]
    if not force and is_done(final, key):
        record_current(dataset, windows=key)
        return key, final, True

    started = time.time()
    with writing(dataset, "windows build"):
        key, cached = build_artifact(
            final, STAGE, params, inputs, lambda tmp: _build(dataset, params, tmp), force=force
        )
        if not cached:
            try:
                con = connect(dataset.store_path)
            except BusyError:  # a reader holds the store: the artifact stands, only the log row is lost
                err.print(f"[yellow]note:[/] store busy, windows {key[:12]} not logged in stage_runs")
            else:
                try:
                    record_stage_run(con, STAGE, key, params, inputs, started)
                finally:
                    con.close()
    record_current(dataset, windows=key)  # what the user just asked for is what train/eval use
    return key, final, cached


def _build(dataset: Dataset, params: dict, out: Path) -> dict[str, Any]:
    T, tau, H = params["context"], params["horizon"], holdout_of(params)
    need = 2 * H + 2
    spill = dataset.windows_dir / f".spill-{out.name}"
    con = connect(dataset.store_path, read_only=True)
    try:
        spill.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = '{_sql_str(str(spill))}'")
        _check_positions(con, dataset)
        vocab = _event_vocab(con)
        (out / EVENTS_FILE).write_text(json.dumps(vocab))
        codes = {"event": pa.array(vocab[1:], pa.string()), "code": pa.array(range(1, len(vocab)), pa.int16())}
        con.register("event_codes", pa.table(codes))

        counts = con.execute(
            f"""SELECT
                  (SELECT count(*) FROM users),
                  (SELECT count(*) FROM items),
                  (SELECT count(*) FROM interactions),
                  greatest((SELECT coalesce(max(item_id), 0) FROM items),
                           (SELECT coalesce(max(item_id), 0) FROM interactions)),
                  count(*) FILTER (WHERE n >= {need}),
                  count(*) FILTER (WHERE n < {need}),
                  coalesce(max(n), 0)
                FROM (SELECT count(*) AS n FROM interactions GROUP BY user_id)"""
        ).fetchall()[0]
        n_users, n_items, n_inter, max_item, n_ok, n_short, longest = (int(x) for x in counts)
        if T > max(longest, DEFAULT_CONTEXT):  # a size from the user, bounded before anything is sized by it
            raise UsageError(f"--context {T} is longer than any history of dataset {dataset.name!r} "
                             f"(the longest has {longest} interactions)",
                             hint=f"use --context {max(longest, DEFAULT_CONTEXT)} or less")
        if n_ok == 0:
            with_h = f"τ = {tau} (2τ targets" if H == tau else f"--holdout {H} (2H targets"
            raise InputError(
                f"no user of dataset {dataset.name!r} has the {need} interactions the {params['protocol']} "
                f"protocol needs with {with_h} + 2 training items)",
                hint="lower --horizon (or use --protocol loo)" if H == tau else "lower --holdout",
            )

        lengths = np.zeros(T + tau + 1, dtype=np.int64)

        def count_lengths(batch: pa.RecordBatch) -> None:
            n = pc.list_value_length(batch.column("items")).to_numpy(zero_copy_only=False)
            lengths[:] += np.bincount(n, minlength=T + tau + 1)[: T + tau + 1]

        n_train = _write(con, _train_sql(T, tau, H, need), TRAIN_SCHEMA, out / "train.parquet", count_lengths)
        n_valid = _write(con, _eval_sql(T, H, need, shift=0), EVAL_SCHEMA, out / "valid.parquet")
        n_test = _write(con, _eval_sql(T, H, need, shift=H), EVAL_SCHEMA, out / "test.parquet")
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)

    # input positions of a window of length L: 0 .. min(T, L-1)-1; position t has min(τ, L-1-t) targets
    n_positions = n_targets = 0
    for L in np.flatnonzero(lengths):
        t = np.arange(min(T, L - 1))
        n_positions += int(lengths[L]) * len(t)
        n_targets += int(lengths[L]) * int(np.minimum(tau, L - 1 - t).sum())
    stats = {
        "context": T,
        "tau": tau,
        "holdout": H,
        "protocol": params["protocol"],
        "min_interactions": need,
        "n_users_train": n_ok,
        "n_users_valid": n_valid,
        "n_users_test": n_test,
        "n_users_too_short": n_short,
        "n_users_without_interactions": n_users - n_ok - n_short,
        "n_train_windows": n_train,
        "n_train_positions": n_positions,
        "n_train_targets": n_targets,
        "max_item_id": max_item,
        "n_store_users": n_users,
        "n_store_items": n_items,
        "n_interactions": n_inter,
        "n_events": len(vocab) - 1,
    }
    return {"dataset": dataset.name, "stats": stats, "built": time.time()}


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


def _check_positions(con: duckdb.DuckDBPyConnection, dataset: Dataset) -> None:
    """`pos` must number each user's interactions 0..n-1 (the store's contract); name a user if not."""
    bad = con.execute(
        """SELECT user_id FROM interactions GROUP BY user_id
           HAVING min(pos) <> 0 OR max(pos) <> count(*) - 1 OR count(DISTINCT pos) <> count(*)
           ORDER BY user_id LIMIT 1"""
    ).fetchall()
    if bad:
        raise InputError(
            f"{dataset.store_path}: interactions.pos of user_id {bad[0][0]} is not 0..n-1 without gaps or ties",
            hint="re-create the dataset with `mhr data …` (the import numbers pos)",
        )


def _event_vocab(con: duckdb.DuckDBPyConnection) -> list[str | None]:
    """[None, e1, e2, …]: code 0 = NULL event, code i = the i-th distinct event in byte order."""
    vocab = [r[0] for r in con.execute(
        "SELECT DISTINCT event FROM interactions WHERE event IS NOT NULL ORDER BY event"
    ).fetchall()]
    if len(vocab) > np.iinfo(np.int16).max:
        raise InputError(
            f"interactions.event has {len(vocab):,} distinct values; windows code events as int16 (≤ 32767)",
            hint="events are interaction types (view, like, buy, rating); map free text to a few types",
        )
    return [None, *vocab]


_CODED = """
    lens AS (SELECT user_id, count(*) - {two_h} AS m FROM interactions GROUP BY user_id
             HAVING count(*) >= {need}),
    x AS (SELECT i.user_id, i.pos, i.item_id, i.ts, coalesce(c.code, 0)::SMALLINT AS ev, l.m
          FROM interactions i JOIN lens l USING (user_id) LEFT JOIN event_codes c ON i.event = c.event)
"""


def _train_sql(T: int, tau: int, H: int, need: int) -> str:
    """Training windows: each training-period interaction (pos < m = n - 2H) joins the windows k
    that hold it.

    With d = m - 1 - pos (distance from the end of the training period), window k holds pos iff
    kT ≤ d < kT + T + τ, so k runs down from d // T over at most ⌈(T+τ)/T⌉ values (a cross join
    with that many offsets; `unnest(range(…))` after the join trips a DuckDB 2.0 internal error).
    Windows k ≥ 1 need m - kT > τ, else they lie inside window k - 1.
    """
    L = T + tau
    n_offsets = -(-L // T) + 1
    return f"""
    WITH {_CODED.format(two_h=2 * H, need=need)},
    z AS (SELECT user_id, pos, item_id, ts, ev, m, m - 1 - pos AS d, (m - 1 - pos) // {T} - o.j AS k
          FROM x CROSS JOIN range(0, {n_offsets}) o(j)
          WHERE pos < m)
    SELECT user_id,
           list(item_id ORDER BY pos) AS items,
           list(ts ORDER BY pos) AS ts,
           list(ev ORDER BY pos) AS events
    FROM z
    WHERE k >= 0 AND d < k * {T} + {L} AND (k = 0 OR m - k * {T} > {tau})
    GROUP BY user_id, k
    ORDER BY user_id, k DESC
    """


def _eval_sql(T: int, H: int, need: int, shift: int) -> str:
    """Valid (shift 0) or test (shift H) rows: the H targets start at c = m + shift."""
    inp = f"pos >= c - {T} AND pos < c"
    tgt = "pos >= c"
    hist = "pos < c"

    def agg(col: str, cond: str) -> str:
        return f"list({col} ORDER BY pos) FILTER (WHERE {cond})"

    return f"""
    WITH {_CODED.format(two_h=2 * H, need=need)},
    y AS (SELECT user_id, pos, item_id, ts, ev, m + {shift} AS c FROM x WHERE pos < m + {shift + H})
    SELECT user_id,
           {agg("item_id", inp)} AS items, {agg("ts", inp)} AS ts, {agg("ev", inp)} AS events,
           {agg("item_id", tgt)} AS targets, {agg("ts", tgt)} AS target_ts, {agg("ev", tgt)} AS target_events,
           {agg("item_id", hist)} AS history
    FROM y
    GROUP BY user_id
    ORDER BY user_id
    """


def _arrow_reader(con: duckdb.DuckDBPyConnection, sql: str) -> pa.RecordBatchReader:
    rel = con.sql(sql)
    for name in ("to_arrow_reader", "fetch_arrow_reader", "record_batch"):
        if hasattr(rel, name):
            return getattr(rel, name)(_BATCH)
    raise RuntimeError("this duckdb has no Arrow batch reader")  # pragma: no cover


def _write(con: duckdb.DuckDBPyConnection, sql: str, schema: pa.Schema, path: Path, on_batch=None) -> int:
    """Stream a query into Parquet in row groups of exactly ROW_GROUP rows (the last one shorter).

    Row groups do not follow DuckDB's batch boundaries (which vary with threads), so the bytes
    depend only on the rows and their order.
    """
    pending: list[pa.RecordBatch] = []
    held = total = 0
    with pq.ParquetWriter(path, schema, compression="zstd", compression_level=3) as writer:
        for batch in _arrow_reader(con, sql):
            batch = pa.RecordBatch.from_arrays(
                [batch.column(i).cast(schema.field(i).type) for i in range(len(schema))], schema=schema
            )
            if on_batch is not None:
                on_batch(batch)
            pending.append(batch)
            held += batch.num_rows
            total += batch.num_rows
            if held >= ROW_GROUP:
                table = pa.Table.from_batches(pending, schema)
                cut = held - held % ROW_GROUP
                writer.write_table(table.slice(0, cut), row_group_size=ROW_GROUP)
                rest = table.slice(cut).combine_chunks()
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP)
    return total


# ---------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class WindowsRef:
    """A built windows artifact: where it is, what it was built with, and how to read its splits.

    `params`: {"context": T, "horizon": τ, "protocol", "format"} and "holdout": H when H ≠ τ (use
    `.holdout`); `event_vocab`: code i → raw event (`event_vocab[0]` is None, the NULL event);
    `stats`: the counts in the manifest.
    """

    path: Path
    key: str
    data_key: str
    params: dict[str, Any]
    event_vocab: list[str | None]
    stats: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def reference(self) -> str:
        return f"windows:{self.key[:12]}"

    @property
    def holdout(self) -> int:
        """H: validation/test targets per user (= τ unless built with `--holdout`)."""
        return holdout_of(self.params)

    def _file(self, split: str) -> Path:
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}", hint=f"use one of: {', '.join(SPLITS)}")
        return self.path / f"{split}.parquet"

    def table(self, split: str, rows: tuple[int, int] | None = None) -> pa.Table:
        """The split's rows (`rows` = (lo, hi): only rows lo..hi-1, reading only the row groups that
        hold them, so a process of a distributed run holds just its shard)."""
        if rows is None:
            return pq.read_table(self._file(split))
        lo, hi = rows
        file = pq.ParquetFile(self._file(split))
        parts, start = [], 0
        for i in range(file.num_row_groups):
            n = file.metadata.row_group(i).num_rows
            if start < hi and start + n > lo:
                part = file.read_row_group(i)
                parts.append(part.slice(max(lo - start, 0), min(hi, start + n) - max(lo, start)))
            start += n
        return pa.concat_tables(parts) if parts else file.schema_arrow.empty_table()

    def count(self, split: str) -> int:
        """Rows of a split (from the Parquet footer, nothing read)."""
        return pq.ParquetFile(self._file(split)).metadata.num_rows

    def seen_items(self, split: str = "train") -> np.ndarray:
        """The distinct item ids in a split's `items`, read a row group at a time."""
        file = pq.ParquetFile(self._file(split))
        seen = [np.unique(pc.list_flatten(file.read_row_group(i, columns=["items"]).column("items"))
                          .to_numpy(zero_copy_only=False)) for i in range(file.num_row_groups)]
        return np.unique(np.concatenate(seen)).astype(np.int64) if seen else np.zeros(0, np.int64)

    def read_split(self, split: str, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """One split (or its rows lo..hi-1) as right-padded numpy arrays (padding: item 0, ts 0, event 0).

        train: items [W, T+τ] int64, ts [W, T+τ] int64, events [W, T+τ] int16, user [W] int64,
               length [W] int64.
        valid/test: items [U, T], ts [U, T], events [U, T] (the last ≤ T interactions before the
               targets), length [U], user [U], targets [U, H] int64, target_ts [U, H] int64,
               target_events [U, H] int16 (H = `.holdout`, τ unless set), history_ptr [U+1] int64 and history_items [nnz] int64
               (CSR: user r's history is history_items[history_ptr[r]:history_ptr[r+1]]).
        """
        table = self.table(split, rows)
        T, tau, H = int(self.params["context"]), int(self.params["horizon"]), self.holdout
        width = T + tau if split == "train" else T
        out: dict[str, np.ndarray] = {"user": table.column("user_id").to_numpy().astype(np.int64)}
        out["items"], out["length"] = pad_lists(table.column("items"), width, np.int64)
        out["ts"], _ = pad_lists(table.column("ts"), width, np.int64)
        out["events"], _ = pad_lists(table.column("events"), width, np.int16)
        if split != "train":
            out["targets"], _ = pad_lists(table.column("targets"), H, np.int64)
            out["target_ts"], _ = pad_lists(table.column("target_ts"), H, np.int64)
            out["target_events"], _ = pad_lists(table.column("target_events"), H, np.int16)
            history = table.column("history").combine_chunks()
            n = pc.list_value_length(history).to_numpy(zero_copy_only=False).astype(np.int64)
            out["history_ptr"] = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            out["history_items"] = history.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        return out


def pad_lists(column: pa.ChunkedArray | pa.Array, width: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list column → (values [R, width] right-padded with 0, lengths [R] int64), vectorised."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and lengths.max() > width:
        raise ValueError(f"a list holds {lengths.max()} values, more than the width {width}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    out = np.zeros((len(lengths), width), dtype=dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(values)) - np.repeat(starts, lengths)
    out[rows, cols] = values
    return out, lengths


def horizon_targets(items: np.ndarray, horizon: int) -> np.ndarray:
    """[W, L] → [W, L, τ]: for each position t the next τ values items[t+1 .. t+τ], 0 past the end.

    Works for any right-padded array (items, event codes); the dtype is kept. Positions beyond a
    window's length see padding (0), so targets past the real sequence are 0 ("none").
    """
    W, L = items.shape
    padded = np.zeros((W, L + horizon), dtype=items.dtype)
    padded[:, :L] = items
    view = np.lib.stride_tricks.sliding_window_view(padded, horizon, axis=1)  # [W, L+1, τ]
    return np.ascontiguousarray(view[:, 1 : L + 1])


def _candidates(dataset: Dataset) -> list[tuple[Path, dict]]:
    """Every complete-looking windows artifact of the dataset (sizes checked, not checksums)."""
    if not dataset.windows_dir.is_dir():
        return []
    found = []
    for d in sorted(dataset.windows_dir.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        manifest = read_manifest(d, verify=False)
        if manifest is not None and manifest.get("stage") == STAGE:
            found.append((d, manifest))
    return found


def _describe_params(p: dict) -> str:
    held = f", H = {p['holdout']}" if "holdout" in p else ""
    return f"T = {p['context']}, τ = {p['horizon']}{held}, {p['protocol']}"


def _build_cmd(p: dict) -> str:
    holdout = f" --holdout {p['holdout']}" if "holdout" in p else ""
    return f"mhr windows build --context {p['context']} --horizon {p['horizon']}{holdout} --protocol {p['protocol']}"


def _listing(found: list[tuple[Path, dict]]) -> str:
    return "; ".join(f"windows:{m['key'][:12]} ({_describe_params(m['params'])})" for _, m in found) or "none"


def find_windows(dataset: Dataset, ref: str | None = None) -> tuple[Path, dict]:
    """The artifact named by `ref` (`windows:<key prefix>`, a key or a prefix), or the dataset's current
    windows: those of the last `mhr windows build` (cached or not), recorded in `current.json`.

    Never picks by time. Without a record (a workspace from before it existed) the only windows built
    for the current store are used; several, or a record whose windows are gone, raise an error that
    lists the alternatives. Staleness of the recorded windows is `load_windows`'s check.
    """
    candidates = _candidates(dataset)
    hint = "build them with `mhr windows build --context T --horizon τ`"
    if ref:
        prefix = ref.split(":", 1)[1] if ref.startswith("windows:") else ref
        hits = [(d, m) for d, m in candidates if prefix and m["key"].startswith(prefix)]
        if not hits:
            raise NotFoundError(f"no windows {ref!r} in {dataset.windows_dir}", hint=hint)
        if len({m["key"] for _, m in hits}) > 1:
            raise UsageError(f"windows reference {ref!r} is ambiguous", hint="give more of the key")
        return hits[0]
    recorded = read_current(dataset).get("windows")
    if recorded:
        hits = [(d, m) for d, m in candidates if m["key"] == recorded]
        if hits:
            return hits[0]
        raise NotFoundError(
            f"the current windows windows:{recorded[:12]} (from the last `mhr windows build`) are missing or "
            f"damaged in {dataset.windows_dir}; built: {_listing(candidates)}",
            hint="rebuild them with `mhr windows build …`, or name them: --windows KEY (`mhr windows show KEY`)",
        )
    if not candidates:
        raise NotFoundError(f"no windows built for dataset {dataset.name!r}", hint=hint)
    current = _current_data_key(dataset)
    fresh = [c for c in candidates if c[1]["inputs"].get("data") == current]
    if len(fresh) == 1:
        return fresh[0]
    if not fresh:
        p = candidates[0][1]["params"]
        raise StaleError(
            f"every windows artifact of dataset {dataset.name} was built from another version of it "
            f"(data key ≠ {current[:12]}): {_listing(candidates)}",
            hint=f"rebuild them with `{_build_cmd(p)}`",
        )
    raise UsageError(
        f"several windows for dataset {dataset.name} and none chosen: {_listing(fresh)}",
        hint="run the `mhr windows build …` you mean (cached builds are instant), or name them: "
             "--windows KEY (`mhr windows show KEY`)",
    )


def _current_data_key(dataset: Dataset) -> str:
    con = connect(dataset.require().store_path, read_only=True)
    try:
        return data_key(con)
    finally:
        con.close()


def load_windows(dataset: Dataset, ref: str | None = None) -> WindowsRef:
    """The windows named by `ref` (or the dataset's current ones, see `find_windows`), checked and ready.

    Raises NotFoundError when there are none, StaleError when they were built from another version
    of the dataset (data keys differ), InputError when the files are damaged.
    """
    path, manifest = find_windows(dataset, ref)
    current = _current_data_key(dataset)
    built_for = manifest["inputs"].get("data", "")
    if built_for != current:
        fresh = [c for c in _candidates(dataset) if c[1]["inputs"].get("data") == current]
        others = "" if ref else f"; windows built for the current data: {_listing(fresh)}"
        raise StaleError(
            f"windows {manifest['key'][:12]} were built from another version of dataset {dataset.name} "
            f"(data key {built_for[:12]} ≠ {current[:12]}){others}",
            hint=f"rebuild them with `{_build_cmd(manifest['params'])}`",
        )
    if read_manifest(path, verify=True) is None:
        raise InputError(
            f"windows {manifest['key'][:12]} in {path} are damaged (a file's checksum differs from {MANIFEST})",
            hint="rebuild them with `mhr windows build … --force`",
        )
    vocab = json.loads((path / EVENTS_FILE).read_text())
    return WindowsRef(path, manifest["key"], built_for, dict(manifest["params"]), vocab,
                      dict(manifest.get("stats", {})), manifest)


def describe_windows(dataset: Dataset, ref: str | None = None) -> dict[str, Any]:
    """What `mhr windows show` prints: reference, params, stats, files and whether it is current."""
    path, manifest = find_windows(dataset, ref)
    current = _current_data_key(dataset)
    return {
        "reference": f"windows:{manifest['key'][:12]}",
        "key": manifest["key"],
        "path": str(path),
        "params": manifest["params"],
        "data_key": manifest["inputs"].get("data"),
        "current": manifest["inputs"].get("data") == current,
        "damaged": read_manifest(path, verify=True) is None,  # a file's checksum differs from the manifest
        "default": manifest["key"] == read_current(dataset).get("windows"),
        "created": manifest.get("created"),
        "stats": manifest.get("stats", {}),
        "files": {name: info["size"] for name, info in manifest["files"].items()},
    }


def sample_rows(n: int, cap: int, seed: int = 0) -> np.ndarray:
    """All of 0..n-1, or a sorted seeded sample of `cap` of them: the same rows for every run on
    the same windows, so evaluations (and validations) of two runs stay paired."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def subset_split(split: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The users at `rows` (sorted indices) of a valid/test split from `read_split`, same layout:
    per-user arrays taken, the CSR history re-pointed."""
    out = {k: v[rows] for k, v in split.items() if k not in ("history_ptr", "history_items")}
    ptr = split["history_ptr"]
    starts, ends = ptr[rows], ptr[rows + 1]
    n = ends - starts
    out["history_ptr"] = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    take = np.repeat(starts - out["history_ptr"][:-1], n) + np.arange(int(n.sum()))
    out["history_items"] = split["history_items"][take]
    return out


def summary_table(info: dict[str, Any]) -> Table:
    """What `mhr windows show` prints: parameters, users and rows per split, users too short."""
    s, p = info["stats"], info["params"]
    held = f", H = {p['holdout']}" if "holdout" in p else ""
    mark = " (current: used by train and eval without --windows)" if info.get("default") else ""
    table = Table(title=f"{info['reference']}  T = {p['context']}, τ = {p['horizon']}{held}, protocol {p['protocol']}"
                  f"{mark}", title_justify="left")
    table.add_column("")
    table.add_column("users", justify="right")
    table.add_column("rows", justify="right")
    table.add_row("train", f"{s['n_users_train']:,}", f"{s['n_train_windows']:,} windows")
    table.add_row("valid", f"{s['n_users_valid']:,}", f"{s['n_users_valid']:,}")
    table.add_row("test", f"{s['n_users_test']:,}", f"{s['n_users_test']:,}")
    table.add_row(f"too short (< {s['min_interactions']})", f"{s['n_users_too_short']:,}", "left out")
    table.caption = (
        f"{s['n_train_positions']:,} input positions, {s['n_train_targets']:,} training targets; "
        f"{s['n_store_items']:,} items (max id {s['max_item_id']:,}), {s['n_events']} event types"
        + ("" if info["current"] else "; [red]stale: built from another version of the dataset[/]")
        + ("; [red]damaged: a file differs from its manifest (rebuild with --force)[/]" if info.get("damaged") else "")
    )
    return table


def log_build(dataset: Dataset, key: str, cached: bool) -> str:
    """What `mhr windows build` (or a recipe's windows step) tells on stderr; returns the reference."""
    info = describe_windows(dataset, key)
    if cached:
        err.print(f"cached: {info['reference']} (key {key[:12]}), now the current windows")
        return info["reference"]
    err.print(summary_table(info))
    short = info["stats"]["n_users_too_short"]
    if short:
        err.print(f"[yellow]{short:,} users have fewer than {info['stats']['min_interactions']} "
                  "interactions and were left out[/]")
    return info["reference"]
