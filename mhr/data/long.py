"""Long logs: one interaction per row in CSV or parquet, with a column mapping; an item table.

CSV is read by DuckDB with explicit column types (ids and events as text; the time column parsed
by `ts_expr`), so a 10M-row file streams through DuckDB's parallel reader with no Python per row.
Without `--time-col` the row order is the time order and `ts` becomes the position.

Item table (`--items`, CSV or parquet): `--item-id-col` (default: the interactions' item column
name), `--item-title-col` (default `title` when present), `--item-text-cols` (joined into
`items.text` as "col: value" parts), `--tag-col` (+ `--tag-sep` to split several tags per value;
list columns give one tag per element). Every other column goes to `items.attrs` JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from mhr.data.source import (
    DELIMITERS,
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    Source,
    conform,
    csv_columns,
    csv_error,
    csv_line_locator,
    duck_path,
    first_line,
    parquet_columns,
    quote_ident,
    reader,
    require_columns,
    require_distinct,
    require_file,
    require_scalar,
    sniff_delimiter,
    ts_expr,
)
from mhr.errors import InputError


@dataclass(frozen=True)
class ItemTable:
    """How to read an item table; shared by the long and paper formats."""

    path: Path
    id_col: str | None = None
    title_col: str | None = None
    text_cols: tuple[str, ...] = ()
    tag_col: str | None = None
    tag_sep: str | None = None


@dataclass(frozen=True)
class LongColumns:
    user: str = "user_id"
    item: str = "item_id"
    time: str | None = "timestamp"
    event: str | None = None
    delimiter: str | None = None


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def relation_sql(con: duckdb.DuckDBPyConnection, path: Path, delimiter: str | None = None) -> tuple[str, dict[str, str], int]:
    """`FROM` clause, column types and first data line for a CSV (header required) or parquet file."""
    require_file(path)
    if is_parquet(path):
        return f"read_parquet('{_esc(duck_path(path))}')", parquet_columns(con, path), 1
    delimiter = delimiter or sniff_delimiter(path)
    cols = csv_columns(con, path, header=True, delim=delimiter)
    if len(cols) == 1 and any(d in cols[0] for d in DELIMITERS if d != delimiter):
        seen = next(d for d in DELIMITERS if d in cols[0])
        raise InputError(f"{path.name}: the header is one column {cols[0]!r} when read as {delimiter!r}-separated; "
                         f"it looks {seen!r}-separated", hint=f"pass --delimiter {seen!r} (or leave it out to sniff)")
    frm = f"read_csv('{_esc(duck_path(path))}', header=true, all_varchar=true, delim='{_esc(delimiter)}')"
    try:
        empty = not con.sql(f"SELECT 1 FROM {frm} LIMIT 1").fetchall()
    except duckdb.Error as e:
        raise csv_error(path, e, delimiter) from None
    if empty:
        raise InputError(f"{path}: header only, no rows (columns: {', '.join(cols)})",
                         hint="give a file with at least one data row")
    return frm, dict.fromkeys(cols, "VARCHAR"), 2


def read_long(path: Path, cols: LongColumns, items: ItemTable | None = None) -> Source:
    con = reader()
    try:
        frm, types, first = relation_sql(con, path, cols.delimiter)
        wanted = {"--user-col": cols.user, "--item-col": cols.item, "--time-col": cols.time, "--event-col": cols.event}
        require_distinct(wanted)
        require_columns(path, list(types), wanted)
        require_scalar(path, types, wanted)
        event = f"CAST({quote_ident(cols.event)} AS VARCHAR)" if cols.event else "CAST(NULL AS VARCHAR)"
        table = None
        if cols.time and not is_parquet(path):
            # fast path: integer epoch times parsed by the CSV reader itself; anything else
            # (blanks, decimals, dates, garbage) falls back to the forgiving text path below
            try:
                table = con.sql(_select(cols, frm.replace("all_varchar=true", "all_varchar=false, types="
                                                          + _types(types, cols.time)), quote_ident(cols.time),
                                        event)).to_arrow_table()
            except duckdb.Error:
                table = None
        if table is None:
            ts = ts_expr(cols.time, types[cols.time]) if cols.time else "CAST(0 AS BIGINT)"
            try:
                table = con.sql(_select(cols, frm, ts, event)).to_arrow_table()
            except duckdb.Error as e:
                if is_parquet(path):
                    raise InputError(f"{path}: cannot read ({first_line(e)})", hint="check the file's format") from None
                raise csv_error(path, e, _delim(frm)) from None
        item_table = read_item_table(con, items, default_id=cols.item) if items else None
    finally:
        con.close()
    if table.num_rows == 0:
        raise InputError(f"{path}: no rows", hint="give a file with at least one interaction")
    return Source(
        name=path.name,
        interactions=conform(table, INTERACTIONS_SCHEMA),
        has_timestamps=cols.time is not None,
        locate=csv_line_locator(path, _delim(frm)) if first > 1 else (lambda i: f"{path.name} row {i + 1}"),
        items=item_table,
        items_name=items.path.name if items else None,
        columns={"user": cols.user, "item": cols.item, "ts": cols.time or "", "event": cols.event or ""},
    )


def _delim(frm: str) -> str:
    """The delimiter a CSV `FROM` clause of `relation_sql` reads with."""
    return frm.split("delim='", 1)[1].split("')", 1)[0].replace("''", "'") if "delim='" in frm else ","


def _select(cols: LongColumns, frm: str, ts: str, event: str) -> str:
    return (f"""SELECT CAST({quote_ident(cols.user)} AS VARCHAR) AS "user",
                      CAST({quote_ident(cols.item)} AS VARCHAR) AS item, {ts} AS ts, {event} AS event FROM {frm}""")


def _types(types: dict[str, str], time_col: str) -> str:
    """A read_csv `types` struct: every column text except the time column as BIGINT."""
    inner = ", ".join(f"'{_esc(c)}': '{'BIGINT' if c == time_col else 'VARCHAR'}'" for c in types)
    return "{" + inner + "}"


def read_item_table(con: duckdb.DuckDBPyConnection, spec: ItemTable, default_id: str) -> pa.Table:
    """An item table as `ITEMS_SCHEMA`: title, joined text, tags and the other columns as attrs."""
    frm, types, _ = relation_sql(con, spec.path)
    id_col = spec.id_col or default_id
    title_col = spec.title_col or ("title" if "title" in types else None)
    require_columns(spec.path, list(types), {"--item-id-col": id_col, "--item-title-col": title_col,
                                             "--tag-col": spec.tag_col})
    for col in spec.text_cols:
        require_columns(spec.path, list(types), {"--item-text-cols": col})
        require_scalar(spec.path, types, {"--item-text-cols": col})
    require_scalar(spec.path, types, {"--item-id-col": id_col, "--item-title-col": title_col})
    require_scalar(spec.path, types, {"--tag-col": spec.tag_col}, lists=True)
    q = quote_ident
    text_parts = [f"CASE WHEN {q(c)} IS NULL OR CAST({q(c)} AS VARCHAR) = '' THEN NULL ELSE "
                  f"{'' if len(spec.text_cols) == 1 else _lit(c + ': ') + ' || '}CAST({q(c)} AS VARCHAR) END"
                  for c in spec.text_cols]
    text = f"concat_ws('. ', {', '.join(text_parts)})" if text_parts else "CAST(NULL AS VARCHAR)"
    if spec.tag_col is None:
        tags = "CAST([] AS VARCHAR[])"
    elif types[spec.tag_col].endswith("[]"):
        tags = f"list_filter(CAST({q(spec.tag_col)} AS VARCHAR[]), t -> t IS NOT NULL AND trim(t) <> '')"
    elif spec.tag_sep:
        tags = (f"list_filter(list_transform(string_split(CAST({q(spec.tag_col)} AS VARCHAR), '{_esc(spec.tag_sep)}'), "
                "t -> trim(t)), t -> t <> '')")
    else:
        tag = f"trim(CAST({q(spec.tag_col)} AS VARCHAR))"
        tags = f"CASE WHEN {tag} IS NULL OR {tag} = '' THEN [] ELSE [{tag}] END"
    used = {id_col, title_col, spec.tag_col, *spec.text_cols}
    rest = [c for c in types if c not in used]
    for c in rest:  # attrs: scalars or lists of scalars; a nested object would be stored as garbage text
        require_scalar(spec.path, types, {"item attribute": c}, lists=True)
    attrs = f"CAST(to_json(struct_pack({', '.join(f'{q(c)} := {q(c)}' for c in rest)})) AS VARCHAR)" if rest else "'{}'"
    title = f"CAST({q(title_col)} AS VARCHAR)" if title_col else "CAST(NULL AS VARCHAR)"
    try:
        table = con.sql(
            f"""SELECT CAST({q(id_col)} AS VARCHAR) AS raw_id, {title} AS title, NULLIF({text}, '') AS text,
                       coalesce({tags}, CAST([] AS VARCHAR[])) AS tags, {attrs} AS attrs
                FROM {frm} WHERE {q(id_col)} IS NOT NULL"""
        ).to_arrow_table()
    except duckdb.Error as e:
        raise InputError(f"{spec.path}: cannot read the item table ({first_line(e)})",
                         hint="check the item file's format and column options") from None
    return conform(table, ITEMS_SCHEMA)


def _lit(value: str) -> str:
    return "'" + _esc(value) + "'"


def _esc(value: object) -> str:
    return str(value).replace("'", "''")
