"""The list-shaped formats: the paper's parquet, one-user-per-line text, Amazon JSON.

All three store a user's history as an ordered list. The paper's parquet carries timestamps; the
other two have none, so their order is kept and `ts` becomes the position. Each reader returns a
`Source` whose interaction rows are in (user row, position) order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from mhr.data.long import ItemTable, read_item_table, relation_sql
from mhr.data.source import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    Source,
    conform,
    duck_path,
    first_line,
    json_attrs,
    parquet_columns,
    quote_ident,
    reader,
    require_columns,
    require_distinct,
    require_file,
    require_scalar,
    ts_expr,
)
from mhr.errors import InputError


def _list_locator(name: str, unit: str, labels: np.ndarray, lengths: np.ndarray) -> Callable[[int], str]:
    """Interaction i -> "file <unit> <label>, position k" from per-list lengths."""
    ends = np.cumsum(lengths)

    def locate(i: int) -> str:
        j = int(np.searchsorted(ends, i, side="right"))
        k = i - (int(ends[j - 1]) if j else 0)
        return f"{name} {unit} {labels[j]}, position {k + 1}"

    return locate


# --- the paper's parquet -----------------------------------------------------------------------


def read_paper(path: Path, items: ItemTable | None, user_col: str = "user_id", item_col: str = "item_id",
               time_col: str = "timestamp", event_col: str | None = "event_id") -> Source:
    """One row per user with list columns `item_id`, `timestamp` and optional `event_id`.

    The user id is `user_col` when the file has it, else the row number (from 1).
    """
    require_file(path)
    con = reader()
    try:
        types = parquet_columns(con, path)
        require_columns(path, list(types), {"--item-col": item_col, "--time-col": time_col})
        require_distinct({"--user-col": user_col, "--item-col": item_col, "--time-col": time_col,
                          "--event-col": event_col})
        for col in (item_col, time_col):
            if not types[col].endswith("[]"):
                raise InputError(f"{path.name}: column {col!r} is {types[col]}, not a list",
                                 hint="the paper layout has one row per user with list columns; use --format long otherwise")
        has_event = event_col is not None and event_col in types
        require_scalar(path, types, {"--item-col": item_col, "--event-col": event_col if has_event else None},
                       lists=True)
        require_scalar(path, types, {"--user-col": user_col if user_col in types else None})
        q = quote_ident
        user = f"CAST({q(user_col)} AS VARCHAR)" if user_col in types else "CAST(file_row_number + 1 AS VARCHAR)"
        frm = f"read_parquet('{_esc(duck_path(path))}', file_row_number=true)"
        bad = con.execute(
            f"SELECT file_row_number, len({q(item_col)}), len({q(time_col)}) FROM {frm} "
            f"WHERE len({q(item_col)}) IS DISTINCT FROM len({q(time_col)}) "
            + (f"OR len({q(event_col)}) IS DISTINCT FROM len({q(item_col)}) " if has_event else "")
            + "ORDER BY file_row_number LIMIT 1"
        ).fetchall()
        if bad:
            bad = bad[0]
            raise InputError(
                f"{path.name} row {bad[0] + 1}: {item_col} has {bad[1]} entries but {time_col} has {bad[2]}"
                + (f" (or {event_col} differs)" if has_event else ""),
                hint="every list column of a user row must have the same length",
            )
        elem = types[time_col][:-2]
        event = f"CAST(unnest({q(event_col)}) AS VARCHAR)" if has_event else "CAST(NULL AS VARCHAR)"
        try:
            table = con.sql(
                f"""SELECT "user", item, {ts_expr('t', elem)} AS ts, event FROM (
                        SELECT file_row_number AS r, {user} AS "user",
                               CAST(unnest({q(item_col)}) AS VARCHAR) AS item, unnest({q(time_col)}) AS t,
                               {event} AS event, unnest(generate_series(1, len({q(item_col)}))) AS k
                        FROM {frm}) ORDER BY r, k"""
            ).to_arrow_table()
            lengths = con.sql(f"SELECT coalesce(len({q(item_col)}), 0) FROM {frm} ORDER BY file_row_number").fetchnumpy()
            null_rows = con.execute(f"SELECT count(*) FROM {frm} WHERE coalesce(len({q(item_col)}), 0) = 0").fetchone()[0]
        except duckdb.Error as e:
            raise InputError(f"{path}: cannot read ({first_line(e)})", hint="check the parquet layout") from None
        n = np.asarray(next(iter(lengths.values())))
        item_table = None
        if items:
            spec = items
            if not items.text_cols and items.path.suffix.lower() in (".parquet", ".pq"):
                spec = _default_text_cols(con, items)
            item_table = read_item_table(con, spec, default_id=item_col)
    finally:
        con.close()
    if table.num_rows == 0:
        raise InputError(f"{path}: no interactions (every list is empty)", hint="check the file")
    return Source(
        name=path.name,
        interactions=conform(table, INTERACTIONS_SCHEMA),
        has_timestamps=True,
        locate=_list_locator(path.name, "row", np.arange(1, len(n) + 1), n),
        items=item_table,
        items_name=items.path.name if items else None,
        columns={"user": user_col, "item": item_col, "ts": time_col, "event": event_col or ""},
        notes=[f"{null_rows} rows whose {item_col} list is null or empty were skipped"] if null_rows else [],
    )


def _default_text_cols(con: duckdb.DuckDBPyConnection, spec: ItemTable) -> ItemTable:
    """Paper item info: title as title, `tag` as the tag, every other text column as text."""
    _, types, _ = relation_sql(con, spec.path)
    id_col = spec.id_col or "item_id"
    tag = spec.tag_col or ("tag" if "tag" in types else None)
    title = spec.title_col or ("title" if "title" in types else None)
    text = tuple(c for c, t in types.items() if t == "VARCHAR" and c not in (id_col, tag, title))
    return ItemTable(spec.path, spec.id_col, title, text, tag, spec.tag_sep)


# --- one user per line -------------------------------------------------------------------------


def _line_with_byte(path: Path, byte: bytes) -> int | None:
    """The first line (from 1) of the file holding `byte`, or None."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if byte in line:
                return n
    return None


def read_sequences(path: Path, attrs_path: Path | None = None) -> Source:
    """`uid i1 i2 …` per line (whitespace-separated, order = time); optional item->attribute-ids JSON.

    Attribute ids become item tags (as text). Blank lines are skipped; a line with a user id but no
    items is counted in the notes.
    """
    require_file(path)
    con = reader()
    try:
        con.execute(
            "CREATE TEMP TABLE lines AS SELECT line FROM read_csv(?, columns={'line': 'VARCHAR'}, "
            "delim='\x1f', quote='', escape='', header=false, auto_detect=false)",
            [duck_path(path)],
        )
        con.execute(
            "CREATE TEMP TABLE seqs AS SELECT rowid + 1 AS ln, regexp_split_to_array(trim(line), '\\s+') AS parts "
            "FROM lines WHERE line IS NOT NULL AND trim(line) <> ''"
        )
        table = con.sql(
            """SELECT "user", item, CAST(0 AS BIGINT) AS ts, CAST(NULL AS VARCHAR) AS event FROM (
                   SELECT ln, parts[1] AS "user", unnest(parts[2:]) AS item,
                          unnest(generate_series(1, len(parts) - 1)) AS k FROM seqs WHERE len(parts) > 1)
               ORDER BY ln, k"""
        ).to_arrow_table()
        meta = con.sql("SELECT ln, len(parts) - 1 AS n FROM seqs WHERE len(parts) > 1 ORDER BY ln").fetchnumpy()
        empty = con.execute("SELECT count(*) FROM seqs WHERE len(parts) = 1").fetchall()[0][0]
    except duckdb.Error as e:
        line = _line_with_byte(path, b"\x1f")
        if line is not None:  # the reader splits on that byte: such a line reads as two columns
            raise InputError(f"{path.name} line {line}: holds the control byte 0x1f (unit separator), which a "
                             "sequence file cannot contain", hint="remove that byte (e.g. tr -d '\\037')") from None
        raise InputError(f"{path}: cannot read as text ({first_line(e)})", hint="one user per line: uid item item …") from None
    finally:
        con.close()
    if table.num_rows == 0:
        raise InputError(f"{path}: no line has a user id followed by items", hint="one user per line: uid item item …")
    notes = [f"{empty} lines with a user id but no items were skipped"] if empty else []
    items = None
    if attrs_path is not None:
        mapping = _load_json(attrs_path)
        if not isinstance(mapping, dict):
            raise InputError(f"{attrs_path}: expected a JSON object item id -> attribute ids",
                             hint='e.g. {"12": [3, 7], "13": [3]}')
        ids = list(mapping)
        tags = [_tag_list(v, f"{attrs_path.name} item {k!r}") for k, v in mapping.items()]
        items = conform(pa.table({
            "raw_id": pa.array(ids, pa.string()), "title": pa.nulls(len(ids), pa.string()),
            "text": pa.nulls(len(ids), pa.string()), "tags": pa.array(tags, pa.list_(pa.string())),
            "attrs": pa.array(["{}"] * len(ids), pa.string()),
        }), ITEMS_SCHEMA)
    return Source(
        name=path.name,
        interactions=conform(table, INTERACTIONS_SCHEMA),
        has_timestamps=False,
        locate=_list_locator(path.name, "line", np.asarray(meta["ln"]), np.asarray(meta["n"])),
        items=items,
        items_name=attrs_path.name if attrs_path else None,
        notes=notes,
    )


# --- Amazon JSON (../shared/data/amazon-scientific) --------------------------------------------


def amazon_files(path: Path) -> tuple[Path, Path | None]:
    """The `*.inter.json` and `*.item.json` of a folder, or the inter file given and its sibling."""
    if path.is_dir():
        inter = sorted(path.glob("*.inter.json"))
        if len(inter) != 1:
            raise InputError(f"{path}: expected one *.inter.json file, found {len(inter)}",
                             hint="point PATH at the .inter.json file itself")
        path = inter[0]
    sibling = path.with_name(path.name.replace(".inter.json", ".item.json"))
    return path, sibling if sibling != path and sibling.is_file() else None


def read_amazon(path: Path, items_path: Path | None = None) -> Source:
    """Users -> ordered item lists; items -> title, description, brand, comma-separated category path.

    tags = [the category path] (one path per tag, levels comma-separated); text = description;
    attrs = every other field (brand, …).
    """
    inter_path, sibling = amazon_files(path)
    items_path = items_path or sibling
    seqs = _load_json(inter_path)
    if not isinstance(seqs, dict):
        raise InputError(f"{inter_path}: expected a JSON object user id -> list of item ids",
                         hint='e.g. {"0": [0, 1, 2], "1": [3, 1]}')
    bad = next((u for u, v in seqs.items() if not isinstance(v, list)), None)
    if bad is not None:
        raise InputError(f"{inter_path.name} user {bad!r}: {json.dumps(seqs[bad])[:60]} is not a list of item ids",
                         hint='e.g. {"0": [0, 1, 2], "1": [3, 1]}')
    users = list(seqs)
    lengths = np.fromiter((len(v) for v in seqs.values()), np.int64, len(users))
    flat = _item_ids(seqs, inter_path.name)
    if not flat:
        raise InputError(f"{inter_path}: every user's list is empty", hint="check the file")
    table = pa.table({
        "user": pa.array(np.repeat(np.array(users, dtype=object), lengths), pa.string()),
        "item": pa.array(flat, pa.string()),
        "ts": pa.array(np.zeros(len(flat), np.int64)),
        "event": pa.nulls(len(flat), pa.string()),
    })
    empty = int((lengths == 0).sum())
    items = _amazon_items(items_path) if items_path else None
    return Source(
        name=inter_path.name,
        interactions=conform(table, INTERACTIONS_SCHEMA),
        has_timestamps=False,
        locate=_list_locator(inter_path.name, "user", np.array(users, dtype=object)[lengths > 0], lengths[lengths > 0]),
        items=items,
        items_name=items_path.name if items_path else None,
        notes=[f"{empty} users with an empty list were skipped"] if empty else [],
    )


def _amazon_items(path: Path) -> pa.Table:
    meta = _load_json(path)
    bad = next((k for k, v in meta.items() if not isinstance(v, dict)), None) if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or bad is not None:
        where = f"{path.name} item {bad!r}: {json.dumps(meta[bad])[:60]} is not a record; " if bad is not None else ""
        raise InputError(f"{where or str(path) + ': '}expected a JSON object item id -> "
                         "{title, description, brand, categories}", hint="check the item file")
    ids, titles, texts, tags, attrs = [], [], [], [], []
    for raw_id, rec in meta.items():
        ids.append(str(raw_id))
        where = f"{path.name} item {raw_id!r}"
        titles.append(_text(rec.get("title"), f"{where} field 'title'"))
        texts.append(_text(rec.get("description"), f"{where} field 'description'"))
        tags.append([t.strip() for t in _tag_list(rec.get("categories"), f"{where} field 'categories'") if t.strip()])
        rest = {k: v for k, v in rec.items() if k not in ("title", "description", "categories") and v not in ("", None)}
        for k, v in rest.items():
            if isinstance(v, dict | list):
                raise InputError(f"{where} field {k!r}: a nested {type(v).__name__}, not a scalar attribute",
                                 hint="attributes must be text, numbers or booleans; flatten or drop the field")
        attrs.append(rest)
    return pa.table({
        "raw_id": pa.array(ids, pa.string()), "title": pa.array(titles, pa.string()),
        "text": pa.array(texts, pa.string()), "tags": pa.array(tags, pa.list_(pa.string())),
        "attrs": json_attrs(attrs),
    })


def _text(value: Any, where: str) -> str | None:
    """A text field: a string or number, or a list of them (joined); nulls in a list are skipped."""
    if value is None:
        return None
    parts = value if isinstance(value, list) else [value]
    bad = next((v for v in parts if isinstance(v, dict | list | bool)), None)
    if bad is not None:
        raise InputError(f"{where}: {json.dumps(bad)[:60]} is not text",
                         hint="text fields hold a string (or a list of strings)")
    value = " ".join(str(v) for v in parts if v is not None).strip()
    return value or None


def _scalar_id(value: Any) -> str | None:
    """An id as text: strings as they are, integers (and integral floats: 2.0 -> "2") as digits;
    None for anything else (null, booleans, objects, lists, fractions)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _item_ids(seqs: dict[str, list], name: str) -> list[str]:
    """Every user's item ids, flattened; a null, boolean, object or fractional id is an error naming
    the user and position (a history with a hole cannot be ordered honestly)."""
    if {type(i) for v in seqs.values() for i in v} <= {str, int}:
        return [i if isinstance(i, str) else str(i) for v in seqs.values() for i in v]
    out = []
    for user, items in seqs.items():
        for k, i in enumerate(items):
            text = _scalar_id(i)
            if text is None:
                raise InputError(f"{name} user {user!r}, position {k + 1}: item id {json.dumps(i)[:60]} is not a "
                                 "string or integer", hint="item lists hold item ids only; remove the entry")
            out.append(text)
    return out


def _tag_list(value: Any, where: str) -> list[str]:
    """Tags (category paths, attribute ids): a scalar or a list of scalars; nulls are skipped (no
    tag), objects, nested lists and booleans are errors."""
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if v is None:
            continue
        text = _scalar_id(v)
        if text is None and isinstance(v, float) and math.isfinite(v):
            text = repr(v)
        if text is None:
            raise InputError(f"{where}: {json.dumps(v)[:60]} is not a tag (text or number)",
                             hint="tags are strings or numbers; nulls are skipped")
        out.append(text)
    return out


def _load_json(path: Path) -> Any:
    require_file(path, "JSON")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})",
                         hint="the file is truncated or not JSON; re-export it") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", hint="re-save the file as UTF-8") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read", hint="the file is not the expected layout "
                         "(a flat object of lists or records); check what was exported") from None


def _esc(value: object) -> str:
    return str(value).replace("'", "''")
