"""The import's fast path (`ingest`, numpy over dictionary codes) against its SQL reference
(`ingest_sql`): identical stores (every table, every row) and identical reports."""

from __future__ import annotations

import random
from pathlib import Path

import duckdb
import numpy as np
import pytest

from mhr.data import dense
from mhr.data.ingest import ingest, ingest_sql
from mhr.data.long import ItemTable, LongColumns, read_long
from mhr.errors import InputError
from mhr.store import new_store

TABLES = {
    "users": "SELECT * FROM users ORDER BY user_id",
    "items": "SELECT * FROM items ORDER BY item_id",
    "interactions": "SELECT user_id, item_id, ts, event, pos FROM interactions ORDER BY user_id, pos",
}


def _csv(path: Path, n: int = 3000, seed: int = 0, sorted_time: bool = False) -> Path:
    """Ties on (user, ts), exact duplicate rows, ids written several ways (" 7", "7.0", "7"),
    numeric and text ids, events with nulls, and users with 1–2 interactions."""
    rnd = random.Random(seed)
    lines = ["user_id,item_id,timestamp,event"]
    for i in range(n):
        u = rnd.choice([f"u{rnd.randrange(40)}", str(rnd.randrange(60)), f" {rnd.randrange(5)} ", "3.0"])
        it = rnd.choice([str(rnd.randrange(80)), f"i{rnd.randrange(30)}", "12.0", " 12"])
        t = i // 3 if sorted_time else rnd.randrange(50)
        ev = rnd.choice(["view", "view", "cart", ""])
        lines.append(f"{u},{it},{t},{ev}")
        if rnd.random() < 0.05:  # an exact duplicate
            lines.append(lines[-1])
    lines += ["lonely,x1,5,view", "pair,x2,6,view", "pair,x3,6,buy"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _store(tmp: Path, name: str, fn, src, **kw) -> tuple[dict, dict]:
    path = tmp / f"{name}.duckdb"
    with new_store(path) as con:
        report = fn(con, src, **kw)
    con = duckdb.connect(str(path), read_only=True)
    try:
        return report, {t: con.execute(q).fetchall() for t, q in TABLES.items()}
    finally:
        con.close()


def _agree(tmp: Path, src, **kw) -> dict:
    fast_report, fast = _store(tmp, "fast", ingest, src, **kw)
    ref_report, ref = _store(tmp, "ref", ingest_sql, src, **kw)
    assert fast_report == ref_report
    for table in TABLES:
        assert fast[table] == ref[table], table
    return fast_report


@pytest.mark.parametrize("dedupe", ["keep", "drop"])
@pytest.mark.parametrize("min_history", [1, 3])
@pytest.mark.parametrize("sorted_time", [False, True])
def test_fast_import_writes_the_reference_store(tmp_path: Path, dedupe: str, min_history: int, sorted_time: bool):
    src = read_long(_csv(tmp_path / "a.csv", sorted_time=sorted_time), LongColumns(event="event"))
    report = _agree(tmp_path, src, dedupe=dedupe, min_history=min_history)
    assert report["duplicates"] > 0
    assert report["short_users_dropped"] > 0 if min_history > 1 else report["short_users_dropped"] == 0


def test_fast_import_without_timestamps_and_with_an_item_table(tmp_path: Path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n12,twelve\n 3 ,three\nnever,unused\n")
    src = read_long(_csv(tmp_path / "a.csv"), LongColumns(time=None, event="event"), ItemTable(items))
    report = _agree(tmp_path, src, min_history=2)
    assert report["duplicates"] == 0 and report["items_never_interacted"] == 1


@pytest.mark.parametrize("bad, what", [
    ("u1,,3,view", "empty item id"), (",a,3,view", "empty user id"), ("u1,a,-4,view", "negative timestamp"),
    ("u1,a\x01b,3,view", "control character"), ("u1,a,,view", "missing timestamp"),
])
def test_fast_and_reference_name_the_same_bad_row(tmp_path: Path, bad: str, what: str):
    path = tmp_path / "bad.csv"
    path.write_text("user_id,item_id,timestamp,event\nu1,a,1,view\nu2,b,2,view\n" + bad + "\nu3,,-1,view\n")
    src = read_long(path, LongColumns(event="event"))
    messages = []
    for fn in (ingest, ingest_sql):
        with pytest.raises(InputError) as e, new_store(tmp_path / f"{fn.__name__}.duckdb") as con:
            fn(con, src)
        messages.append(e.value.message)
    assert messages[0] == messages[1] and what in messages[0] and "line 4" in messages[0]


def test_chronological_order_packed_and_lexsort_agree():
    rng = np.random.default_rng(0)
    uid = rng.integers(1, 50, 5000)
    for ts in (rng.integers(0, 20, 5000), np.sort(rng.integers(0, 20, 5000)), rng.integers(0, 2**60, 5000)):
        assert np.array_equal(dense.chronological(uid, ts), np.lexsort((ts, uid)))


def test_dictionary_codes_rebuild_the_column():
    import pyarrow as pa

    col = pa.chunked_array([pa.array(["b", None, "a"]), pa.array([], pa.string()), pa.array(["a", "c", None, "b"])])
    values, codes = dense._dictionary(col)
    got = [None if c < 0 else values[int(c)].as_py() for c in codes]
    assert got == col.to_pylist() and sorted(values.to_pylist()) == ["a", "b", "c"]
    assert dense.user_positions(np.array([1, 1, 1, 3, 3, 4], np.int32)).tolist() == [0, 1, 2, 0, 1, 0]
