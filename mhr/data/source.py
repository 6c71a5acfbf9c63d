"""The normalized form every importer produces, and the checks they share.

Each format reader turns its files into a `Source`: Arrow tables in one fixed shape, rows in the
order of the source, so one ingest function (`mhr.data.ingest`) can number, order and store any of
them the same way. Readers do the format-specific parsing (with DuckDB, never row loops in Python)
and report problems they can see in the files themselves (missing columns, empty files); the
ingest reports problems in the data (missing or negative timestamps, duplicates).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from mhr.errors import InputError

# A timestamp that is present but is neither a number nor an ISO date; the ingest turns it into
# an InputError naming the row (keeping it in the BIGINT column avoids a second string column).
TS_INVALID = -(2**63)

INTERACTIONS_SCHEMA = pa.schema(
    [("user", pa.string()), ("item", pa.string()), ("ts", pa.int64()), ("event", pa.string())]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("raw_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("attrs", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema([("raw_id", pa.string()), ("attrs", pa.string())])


@dataclass
class Source:
    """One dataset as read from its files, before ids are assigned.

    interactions: `user, item` (raw ids as text), `ts` (BIGINT; NULL = missing, `TS_INVALID` =
    unparseable; 0 everywhere when the source has no timestamps), `event` (text or NULL), rows in
    source order. items / users: optional metadata keyed by raw id (`ITEMS_SCHEMA`,
    `USERS_SCHEMA`). `locate(i)` names the i-th interaction row in the files, for error messages.
    `columns` maps user/item/ts/event to the source's column names, also for messages.
    """

    name: str
    interactions: pa.Table
    has_timestamps: bool
    locate: Callable[[int], str]
    items: pa.Table | None = None
    users: pa.Table | None = None
    items_name: str | None = None
    columns: dict[str, str] = field(default_factory=lambda: {"user": "user", "item": "item", "ts": "ts"})
    notes: list[str] = field(default_factory=list)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a reader's table to the exact shared schema (column order, types)."""
    return pa.table([table.column(f.name).cast(f.type) for f in schema], schema=schema)


def line_locator(path: Path, first_line: int) -> Callable[[int], str]:
    """Row i of a line-oriented file whose first data row is on line `first_line` (1-based)."""
    return lambda i: f"{path.name} line {i + first_line}"


def files_sha256(paths: Iterable[Path]) -> str:
    """One digest over the bytes of every input file, in the order given (the import's input key)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def table_sha256(*tables: pa.Table | None) -> str:
    """A digest of table contents (Arrow IPC bytes): equal for equal data, whatever route made it."""
    h = hashlib.sha256()
    for table in tables:
        if table is None:
            h.update(b"none")
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def require_file(path: Path, what: str = "input") -> Path:
    """Exists, is a file and is not empty (an empty file is a mistake, not an empty dataset)."""
    if not path.exists():
        raise InputError(f"{path}: no such file", hint=f"check the {what} path")
    if not path.is_file():
        raise InputError(f"{path} is not a file", hint=f"give the {what} file itself")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)", hint=f"give a {what} file with a header and rows")
    return path


def require_columns(path: Path, have: Sequence[str], want: dict[str, str | None]) -> None:
    """Each wanted column (option name -> column) must exist; name the closest match if not."""
    for option, column in want.items():
        if column is None or column in have:
            continue
        close = difflib.get_close_matches(column, list(have), n=1, cutoff=0.5)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(
            f"{path.name}: no column {column!r} (columns: {', '.join(have)}){guess}",
            hint=f"pass {option} with one of the columns above",
        )


def csv_columns(con: duckdb.DuckDBPyConnection, path: Path, **options: Any) -> list[str]:
    """Header names of a CSV file as DuckDB sees them (all columns as text)."""
    try:
        rel = con.sql(
            f"SELECT * FROM read_csv(?, all_varchar=true{_opts(options)}) LIMIT 0",
            params=[duck_path(path)],
        )
    except duckdb.Error as e:
        raise csv_error(path, e, options.get("delim") or ",") from None
    return list(rel.columns)


DELIMITERS = (",", "\t", ";", "|")


def sniff_delimiter(path: Path) -> str:
    """The field separator of a CSV with a header: the candidate the header line holds most of.

    Decided from the header alone (DuckDB's own sniffer gives up on a file with one ragged row and
    then reports a missing column instead of the row)."""
    with open(path, "rb") as f:
        head = f.readline().decode("utf-8", errors="replace")
    counts = {d: head.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def csv_line_locator(path: Path, delimiter: str) -> Callable[[int], str]:
    """Data row i of a CSV with a header -> its physical line, counting newlines inside quotes.
    Scans the file, so it is only called for an error message."""

    def locate(i: int) -> str:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter=delimiter)
            next(reader, None)
            k, start = 0, reader.line_num + 1
            for row in reader:
                if row:
                    if k == i:
                        return f"{path.name} line {start}"
                    k += 1
                start = reader.line_num + 1
        return f"{path.name} row {i + 1}"

    return locate


def csv_error(path: Path, error: BaseException, delimiter: str) -> InputError:
    """What is really wrong with a CSV DuckDB refused: bytes that are not UTF-8, or a row whose
    field count differs from the header's (often the wrong delimiter), each with its line."""
    text = str(error).lower()
    if "unicode" in text or "utf-8" in text or "encoding" in text:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return InputError(f"{path.name} line {n}: not UTF-8 text (byte {line[e.start]:#04x})",
                                      hint="re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, [])
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):
                return InputError(
                    f"{path.name} line {start}: {len(row)} fields, the header has {len(header)} "
                    f"(read as {delimiter!r}-separated)",
                    hint="fix the row, or pass the right --delimiter")
            start = reader.line_num + 1
    return InputError(f"{path}: cannot read as CSV ({first_line(error)})", hint="check the file's format")


def parquet_columns(con: duckdb.DuckDBPyConnection, path: Path) -> dict[str, str]:
    """Column name -> DuckDB type of a parquet file; a truncated or foreign file is an InputError."""
    try:
        rows = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [duck_path(path)]).fetchall()
        con.execute("SELECT count(*) FROM read_parquet(?)", [duck_path(path)]).fetchall()[0]
    except duckdb.Error as e:
        raise InputError(
            f"{path}: not a readable parquet file ({first_line(e)})",
            hint="the file is truncated or not parquet; re-export or re-download it",
        ) from None
    return {name: typ for name, typ, *_ in rows}


def require_distinct(want: dict[str, str | None]) -> None:
    """No column mapped to two roles (the same column as user and item makes every user buy itself)."""
    seen: dict[str, str] = {}
    for option, column in want.items():
        if column is None:
            continue
        if column in seen:
            raise InputError(f"{seen[column]} and {option} are both column {column!r}",
                             hint="each role (user, item, time, event) needs its own column")
        seen[column] = option


def is_scalar_type(duck_type: str) -> bool:
    """A DuckDB column type holding one plain value per row (not a struct, map, union or list)."""
    t = duck_type.upper()
    return not (t.endswith("]") or any(k in t for k in ("STRUCT", "MAP(", "UNION")))


def require_scalar(path: Path, types: dict[str, str], want: dict[str, str | None], lists: bool = False) -> None:
    """Each named column holds scalars (or, with `lists`, lists of scalars): a struct would become an
    id or tag like "{'id': 2}"."""
    for option, column in want.items():
        if column is None:
            continue
        t = types[column]
        inner = t[:-2] if lists and t.endswith("[]") else t
        if not is_scalar_type(inner):
            kind = "text or a list of text" if lists else "one plain value (text or a number)"
            raise InputError(f"{path.name}: column {column!r} ({option}) holds {t} values, not {kind}",
                             hint="flatten the column, or pick another one")


def ts_expr(column: str, duck_type: str = "VARCHAR") -> str:
    """SQL turning a time column into BIGINT: numbers as they are, ISO dates as epoch seconds.

    An ISO time with a UTC offset (`2020-01-01T00:00:00+05:00`, `…Z`) is honoured; one without is
    UTC (the reading connection's time zone, see `reader`). NULL or blank stays NULL (the ingest
    reports it as missing); anything else unparseable, NaN, infinite or beyond BIGINT becomes
    `TS_INVALID` (reported with its row).
    """
    c = quote_ident(column)
    t = duck_type.upper()
    if t in ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UINTEGER", "USMALLINT", "UTINYINT"):
        return f"CAST({c} AS BIGINT)"
    if t in ("UBIGINT", "HUGEINT", "UHUGEINT"):
        return f"CASE WHEN {c} IS NULL THEN NULL ELSE coalesce(TRY_CAST({c} AS BIGINT), {TS_INVALID}) END"
    if t in ("DOUBLE", "FLOAT", "REAL") or t.startswith("DECIMAL"):
        return f"CASE WHEN {c} IS NULL THEN NULL ELSE coalesce({_finite_seconds(f'CAST({c} AS DOUBLE)')}, {TS_INVALID}) END"
    if t.startswith("TIMESTAMP") or t == "DATE":
        return f"CASE WHEN {c} IS NULL THEN NULL WHEN isfinite({c}) THEN CAST(epoch({c}) AS BIGINT) ELSE {TS_INVALID} END"
    v = f"trim(CAST({c} AS VARCHAR))"
    tz = f"TRY_CAST({v} AS TIMESTAMPTZ)"
    return (
        f"CASE WHEN {c} IS NULL OR {v} = '' THEN NULL ELSE COALESCE("
        f"TRY_CAST({v} AS BIGINT), {_finite_seconds(f'TRY_CAST({v} AS DOUBLE)')}, "
        f"CASE WHEN isfinite({tz}) THEN CAST(epoch({tz}) AS BIGINT) END, {TS_INVALID}) END"
    )


def _finite_seconds(x: str) -> str:
    """A DOUBLE as rounded BIGINT seconds; NULL when NaN, infinite or beyond BIGINT."""
    return f"CASE WHEN isfinite({x}) AND abs({x}) < 9.2e18 THEN CAST(round({x}) AS BIGINT) END"


def duck_path(path: Path) -> str:
    """`path` for DuckDB's readers, taken literally: they expand `*`, `?` and `[…]` as globs, so a file
    named `star*.csv` would also read `starX.csv`. Each such character becomes a one-character class."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in str(path))


def reader() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB for parsing input files; times without an offset are read as UTC."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def json_attrs(rows: list[dict[str, Any]]) -> pa.Array:
    """Per-row attribute dicts as compact JSON text (None values dropped)."""
    return pa.array(
        [json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False, sort_keys=True) for r in rows],
        pa.string(),
    )


def _opts(options: dict[str, Any]) -> str:
    out = ""
    for key, value in options.items():
        out += f", {key}={_sql_literal(value)}"
    return out


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"
