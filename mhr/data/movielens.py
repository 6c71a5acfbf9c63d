"""MovieLens in every layout GroupLens ships, plus RecBole's atomic copy of ML-100K.

Layouts, recognised by the ratings file found in the folder (or archive):
  100K            u.data (tab), u.item / u.user ('|', latin-1), u.genre
  1M, 10M         ratings.dat, movies.dat, users.dat (1M only), '::'-separated
  20M/25M/32M/latest-small   ratings.csv, movies.csv (quoted CSV)
Any of them may carry a header row or not (detected from the first line).

The store shape is the same for all: `event` = the rating as text ("4", "3.5"), `tags` = genres,
`title` = the title as GroupLens writes it ("Toy Story (1995)"), `attrs.year` = the year in the
title's last parentheses, users.attrs = age/gender/occupation/zip where the layout has them.
RecBole's ML-100K files split the year off the title and misspell item 267; `read_recbole_100k`
undoes both so the two routes of `mhr data fetch movielens-100k` give identical stores.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from mhr.data.source import (
    INTERACTIONS_SCHEMA,
    Source,
    conform,
    duck_path,
    first_line,
    json_attrs,
    line_locator,
    reader,
    require_file,
    ts_expr,
)
from mhr.errors import InputError

# u.genre order (the column order of the one-hot flags in u.item).
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
# ML-1M users.dat occupation codes (README of ml-1m).
OCCUPATIONS_1M = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip

_YEAR = re.compile(r"\((\d{4})\)\s*$")
RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")


def find_layout(root: Path) -> tuple[Path, str]:
    """The folder holding the ratings file (root or one level down) and its file name."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for name in RATINGS_FILES:
            if (folder / name).is_file():
                return folder, name
    raise InputError(
        f"{root}: no MovieLens ratings file ({', '.join(RATINGS_FILES)}) here or one folder down",
        hint="point PATH at an extracted MovieLens archive (e.g. ml-1m/) or the .zip itself",
    )


def input_files(folder: Path, ratings: str) -> list[Path]:
    """The files a layout reads (their bytes make the input key)."""
    names = {
        "u.data": ["u.data", "u.item", "u.user"],
        "ratings.dat": ["ratings.dat", "movies.dat", "users.dat"],
        "ratings.csv": ["ratings.csv", "movies.csv"],
    }[ratings]
    return [folder / n for n in names if (folder / n).is_file()]


def read_movielens(folder: Path, ratings: str) -> Source:
    """Read one MovieLens layout from an extracted folder."""
    con = reader()
    try:
        if ratings == "u.data":
            return _read_100k(con, folder)
        if ratings == "ratings.dat":
            return _read_dat(con, folder)
        return _read_csv_layout(con, folder)
    finally:
        con.close()


def title_attrs(title: str | None) -> dict:
    match = _YEAR.search(title or "")
    return {"year": int(match.group(1))} if match else {}


# --- ratings -----------------------------------------------------------------------------------


def _has_header(path: Path, delim: str) -> bool:
    with open(path, "rb") as f:
        line = f.readline().decode("utf-8", errors="replace").strip()
    if not line:
        raise InputError(f"{path}: the first line is empty", hint="remove blank lines at the top of the file")
    return not line.split(delim)[0].strip().lstrip("-").isdigit()


def _read_ratings(con: duckdb.DuckDBPyConnection, path: Path, delim: str) -> tuple[pa.Table, int]:
    """user, item, ts, event (rating as text) from a 4-column ratings file; returns (table, first line)."""
    require_file(path, "ratings")
    header = _has_header(path, delim)
    cols = "{'user': 'VARCHAR', 'item': 'VARCHAR', 'rating': 'VARCHAR', 'ts': 'VARCHAR'}"
    rating = "TRY_CAST(rating AS DOUBLE)"
    try:
        table = con.sql(
            f"""SELECT trim("user") AS "user", trim(item) AS item, {ts_expr('ts')} AS ts,
                   CASE WHEN NOT isfinite({rating}) THEN NULL
                        WHEN {rating} = floor({rating}) THEN CAST(CAST({rating} AS BIGINT) AS VARCHAR)
                        ELSE CAST({rating} AS VARCHAR) END AS event,
                   coalesce(NOT isfinite({rating}), true) AS bad_rating, rating
            FROM read_csv(?, delim=?, header={str(header).lower()}, columns={cols}, quote='', escape='',
                          null_padding=false, auto_detect=false)""",
            params=[duck_path(path), delim],
        ).to_arrow_table()
    except duckdb.Error as e:
        raise InputError(
            f"{path}: not a MovieLens ratings file ({first_line(e)})",
            hint="each row must be user, item, rating, timestamp",
        ) from None
    if table.num_rows == 0:
        raise InputError(f"{path}: header only, no ratings", hint="give a ratings file with rows")
    first = 2 if header else 1
    bad = table.column("bad_rating")
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raw = table.column("rating")[i].as_py()
        raise InputError(f"{path.name} line {i + first}: rating {'missing' if raw is None else repr(raw)} is not a "
                         "finite number", hint="each row must be user, item, rating, timestamp; fix or remove it")
    return conform(table, INTERACTIONS_SCHEMA), first


def _source(name: str, path: Path, inter: pa.Table, first: int, items: pa.Table | None,
            users: pa.Table | None, items_name: str | None) -> Source:
    return Source(
        name=name,
        interactions=inter,
        has_timestamps=True,
        locate=line_locator(path, first),
        items=items,
        users=users,
        items_name=items_name,
        columns={"user": "user id", "item": "movie id", "ts": "timestamp"},
    )


# --- 100K --------------------------------------------------------------------------------------


def _decode(path: Path) -> list[str]:
    """Lines of a small metadata file: UTF-8, else latin-1 (GroupLens' older files)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return [line for line in text.splitlines() if line.strip()]


def _genres(path: Path) -> list[str]:
    """u.genre: `name|id` lines; the names in id order (the order of u.item's genre flags)."""
    pairs = []
    for n, line in enumerate(_decode(path), 1):
        name, _, gid = line.rpartition("|")
        if not name or not gid.strip().isdigit():
            raise InputError(f"{path} line {n}: {line.strip()!r} is not 'genre|id'",
                             hint="each u.genre line is a genre name, '|', and its integer id")
        pairs.append((int(gid), name))
    ids = [g for g, _ in pairs]
    if sorted(ids) != list(range(len(ids))):
        raise InputError(f"{path}: genre ids are {sorted(ids)[:8]}…, not 0..{len(ids) - 1} each once",
                         hint="u.genre numbers its genres 0, 1, 2, … in the order of u.item's flags")
    return [name for _, name in sorted(pairs)]


def _read_100k(con: duckdb.DuckDBPyConnection, folder: Path) -> Source:
    inter, first = _read_ratings(con, folder / "u.data", "\t")
    genres = list(GENRES_100K)
    if (folder / "u.genre").is_file():
        genres = _genres(folder / "u.genre") or genres
    items = None
    if (folder / "u.item").is_file():
        rows = [line.split("|") for line in _decode(folder / "u.item")]
        rows = [r for r in rows if r[0].strip().isdigit()]  # skip a header row if any
        bad = next((i for i, r in enumerate(rows) if len(r) != 5 + len(genres)), None)
        if bad is not None:
            raise InputError(
                f"{folder / 'u.item'} row {bad + 1}: {len(rows[bad])} fields, expected {5 + len(genres)}",
                hint="u.item rows are id|title|release date|video date|url|one 0/1 flag per genre",
            )
        titles = [r[1].strip() for r in rows]
        items = _items(
            [r[0].strip() for r in rows],
            titles,
            [[g for g, flag in zip(genres, r[5:], strict=True) if flag.strip() == "1"] for r in rows],
            [title_attrs(t) for t in titles],
        )
    users = None
    if (folder / "u.user").is_file():
        rows = [line.split("|") for line in _decode(folder / "u.user")]
        rows = [r for r in rows if r[0].strip().isdigit() and len(r) >= 4]
        users = _users(
            [r[0].strip() for r in rows],
            [
                {"age": _int(r[1]), "gender": r[2].strip(), "occupation": r[3].strip(),
                 "zip": r[4].strip() if len(r) > 4 else None}
                for r in rows
            ],
        )
    return _source("movielens-100k", folder / "u.data", inter, first, items, users, "u.item")


def read_recbole_100k(folder: Path) -> Source:
    """RecBole's atomic ML-100K (`ml-100k.inter/.item/.user`) mapped to the GroupLens form.

    RecBole stores `movie_title` without the "(year)" suffix and the year as `release_year`,
    genres space-separated in `class`, and item 267 as "unkonwn"; the GroupLens title is
    rebuilt as "title (year)" (item 267: "unknown", no year).
    """
    con = reader()
    try:
        path = require_file(folder / "ml-100k.inter", "ratings")
        rating = "TRY_CAST(\"rating:float\" AS DOUBLE)"
        inter = con.sql(
            f"""SELECT "user_id:token" AS "user", "item_id:token" AS item,
                   {ts_expr('timestamp:float')} AS ts,
                   CASE WHEN {rating} = floor({rating}) THEN CAST(CAST({rating} AS BIGINT) AS VARCHAR)
                        ELSE CAST({rating} AS VARCHAR) END AS event
            FROM read_csv(?, delim='\t', header=true, all_varchar=true, quote='', escape='')""",
            params=[duck_path(path)],
        ).to_arrow_table()
    finally:
        con.close()
    order = {g: i for i, g in enumerate(GENRES_100K)}
    rows = [line.split("\t") for line in _decode(folder / "ml-100k.item")[1:]]
    titles = []
    for r in rows:
        title, year = r[1].strip(), r[2].strip()
        titles.append("unknown" if (title, year) == ("unkonwn", "unkonwn") else f"{title} ({year})")
    items = _items(
        [r[0].strip() for r in rows],
        titles,
        [sorted(r[3].split(), key=lambda g: order.get(g, len(order))) for r in rows],
        [title_attrs(t) for t in titles],
    )
    urows = [line.split("\t") for line in _decode(folder / "ml-100k.user")[1:]]
    users = _users(
        [r[0].strip() for r in urows],
        [{"age": _int(r[1]), "gender": r[2].strip(), "occupation": r[3].strip(), "zip": r[4].strip()}
         for r in urows],
    )
    return _source("movielens-100k", path, conform(inter, INTERACTIONS_SCHEMA), 2, items, users, "u.item")


# --- 1M / 10M ----------------------------------------------------------------------------------


def _read_dat(con: duckdb.DuckDBPyConnection, folder: Path) -> Source:
    inter, first = _read_ratings(con, folder / "ratings.dat", "::")
    items = _movies(folder / "movies.dat", lambda line: line.split("::"))
    users = None
    if (folder / "users.dat").is_file():
        rows = [line.split("::") for line in _decode(folder / "users.dat")]
        rows = [r for r in rows if r[0].strip().isdigit() and len(r) >= 4]
        users = _users(
            [r[0].strip() for r in rows],
            [
                {"gender": r[1].strip(), "age": _int(r[2]), "occupation": _occupation(r[3]),
                 "zip": r[4].strip() if len(r) > 4 else None}
                for r in rows
            ],
        )
    name = "movielens-1m" if users is not None else "movielens-10m"
    return _source(name, folder / "ratings.dat", inter, first, items, users, "movies.dat")


# --- 20M / 25M / 32M / latest-small ------------------------------------------------------------


def _read_csv_layout(con: duckdb.DuckDBPyConnection, folder: Path) -> Source:
    inter, first = _read_ratings(con, folder / "ratings.csv", ",")
    items = None
    path = folder / "movies.csv"
    if path.is_file():
        require_file(path, "movies")
        header = _has_header(path, ",")
        try:
            rows = con.sql(
                f"""SELECT * FROM read_csv(?, header={str(header).lower()}, quote='"', escape='"',
                    columns={{'id': 'VARCHAR', 'title': 'VARCHAR', 'genres': 'VARCHAR'}}, auto_detect=false)""",
                params=[duck_path(path)],
            ).fetchall()
        except duckdb.Error as e:
            raise InputError(f"{path}: not a movies.csv ({first_line(e)})", hint="rows are movieId,title,genres") from None
        items = _movie_rows(rows)
    return _source("movielens", folder / "ratings.csv", inter, first, items, None, "movies.csv")


def _movies(path: Path, split) -> pa.Table | None:
    if not path.is_file():
        return None
    rows = [split(line) for line in _decode(path)]
    rows = [(r[0].strip(), "::".join(r[1:-1]), r[-1]) for r in rows if r[0].strip().isdigit() and len(r) >= 3]
    return _movie_rows(rows)


def _movie_rows(rows: list[tuple]) -> pa.Table:
    genres = [[g for g in (gs or "").split("|") if g and g != "(no genres listed)"] for _, _, gs in rows]
    titles = [(t or "").strip() for _, t, _ in rows]
    return _items([str(r[0]).strip() for r in rows], titles, genres, [title_attrs(t) for t in titles])


# --- helpers -----------------------------------------------------------------------------------


def _items(ids: list[str], titles: list[str], tags: list[list[str]], attrs: list[dict]) -> pa.Table:
    return pa.table(
        {
            "raw_id": pa.array(ids, pa.string()),
            "title": pa.array(titles, pa.string()),
            "text": pa.nulls(len(ids), pa.string()),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "attrs": json_attrs(attrs),
        }
    )


def _users(ids: list[str], attrs: list[dict]) -> pa.Table:
    return pa.table({"raw_id": pa.array(ids, pa.string()), "attrs": json_attrs(attrs)})


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _occupation(code: str) -> str | None:
    c = _int(code)
    return OCCUPATIONS_1M[c] if c is not None and c < len(OCCUPATIONS_1M) else code.strip() or None
