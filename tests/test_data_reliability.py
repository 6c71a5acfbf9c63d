"""Reliability, data side: literal paths, UTC offsets, non-scalar values, --force keeping
priors, damaged archives and deep JSON, normalised ids; each reproduced through the real CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_data_common import json_file, long_csv, meta, mhr, ok, rows, write

LONG = ("--format", "long", "--user-col", "uid", "--item-col", "sku", "--time-col", "t")


def fails(ws: Path, *args: str, code: int = 2) -> str:
    got, out, err = mhr(ws, *args)
    assert got == code and out == "", f"exit {got}:\n{err}"
    assert "Traceback" not in err and err.startswith("error:"), err
    return err


# --- paths are literal, never glob patterns -------------------------------------------------------


def _long_rows(n: int, user: str = "u") -> dict:
    return {"uid": [f"{user}{i % 3}" for i in range(n)], "sku": [f"i{i}" for i in range(n)],
            "t": list(range(n))}


def _write_long(path: Path, data: dict) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.table(data), path)
    else:
        write(path, "uid,sku,t\n" + "".join(f"{u},{i},{t}\n" for u, i, t in zip(*data.values(), strict=True)))
    return path


def _write_seq(path: Path, data: dict) -> Path:
    return write(path, "".join(f"{u} {i}\n" for u, i in zip(data["uid"], data["sku"], strict=True)))


def _write_paper(path: Path, data: dict) -> Path:
    pq.write_table(pa.table({"item_id": [[int(i[1:]) for i in data["sku"]]], "timestamp": [data["t"]]}), path)
    return path


GLOB_CASES = [
    ("star*.csv", "starX.csv", _write_long, LONG),
    ("q[1].csv", "q1.csv", _write_long, LONG),
    ("what?.parquet", "whatX.parquet", _write_long, LONG),
    ("s*.txt", "sX.txt", _write_seq, ("--format", "sequence")),
    ("p*.parquet", "pX.parquet", _write_paper, ("--format", "paper")),
]


@pytest.mark.parametrize("name,other,writer,fmt", GLOB_CASES, ids=[c[0] for c in GLOB_CASES])
def test_paths_are_literal_not_globs(workspace: Path, tmp_path: Path, name: str, other: str, writer, fmt: tuple):
    path = writer(tmp_path / name, _long_rows(9))
    writer(tmp_path / other, _long_rows(30, user="v"))  # what a glob would also read
    ok(workspace, "data", "import", str(path), *fmt, "--name", "d")
    assert rows(workspace, "d", "SELECT count(*) FROM interactions") == [(9,)]


def test_item_table_path_is_literal(workspace: Path, tmp_path: Path):
    write(tmp_path / "it*.csv", "sku,title\na,A\n")
    write(tmp_path / "itX.csv", "sku,title\na,WRONG\nb,B\n")
    ok(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *LONG, "--items", str(tmp_path / "it*.csv"),
       "--name", "d")
    assert rows(workspace, "d", "SELECT raw_id, title FROM items ORDER BY 1") == [
        ("a", "A"), ("b", None), ("c", None), ("d", None)]


# --- ISO timestamps keep their UTC offset ---------------------------------------------------------


def test_utc_offsets_are_honoured_in_csv(workspace: Path, tmp_path: Path):
    # u1's rows in file order: 23:00Z, then 03:00+05:00 (= 22:00Z the day before): the second is first
    write(tmp_path / "e.csv", "uid,sku,t\nu1,late,2019-12-31T23:00:00Z\nu1,early,2020-01-01T03:00:00+05:00\n"
                              "u2,x,2020-01-01T00:00:00+05:00\nu2,y,2020-01-01 00:00:00\n")
    ok(workspace, "data", "import", str(tmp_path / "e.csv"), *LONG, "--name", "d")
    got = rows(workspace, "d", "SELECT u.raw_id, i.raw_id, ts, pos FROM interactions JOIN users u USING (user_id) "
                              "JOIN items i USING (item_id) ORDER BY 1, pos")
    assert got == [("u1", "early", 1577829600, 0), ("u1", "late", 1577833200, 1),
                   ("u2", "x", 1577818800, 0), ("u2", "y", 1577836800, 1)]


def test_utc_offsets_are_honoured_in_paper_lists(workspace: Path, tmp_path: Path):
    pq.write_table(pa.table({"item_id": [[1, 2]], "timestamp": [["2020-01-01T00:00:00+05:00", "2020-01-01T00:00:00Z"]]}),
                   tmp_path / "p.parquet")
    ok(workspace, "data", "import", str(tmp_path / "p.parquet"), "--format", "paper", "--name", "d")
    assert rows(workspace, "d", "SELECT ts FROM interactions ORDER BY pos") == [(1577818800,), (1577836800,)]


def test_timestamptz_parquet_column(workspace: Path, tmp_path: Path):
    import datetime as dt

    tz = dt.timezone(dt.timedelta(hours=5))
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["x"],
                             "timestamp": pa.array([dt.datetime(2020, 1, 1, tzinfo=tz)], pa.timestamp("s", tz="+05:00"))}),
                   tmp_path / "l.parquet")
    ok(workspace, "data", "import", str(tmp_path / "l.parquet"), "--format", "long", "--name", "d")
    assert rows(workspace, "d", "SELECT ts FROM interactions") == [(1577818800,)]


# --- non-scalar values are refused (nulls in tag lists skipped) -----------------------------------


AMAZON_BAD = [
    ({"0": [1, None]}, "user '0', position 2: item id null"),
    ({"0": [1, {"id": 2}]}, 'position 2: item id {"id": 2}'),
    ({"0": [True, 2]}, "position 1: item id true"),
    ({"0": [1.5]}, "position 1: item id 1.5"),
    ({"0": [1], "1": None}, "user '1': null is not a list"),
]


@pytest.mark.parametrize("seqs,fragment", AMAZON_BAD, ids=["null", "object", "bool", "fraction", "user-null"])
def test_amazon_item_lists_refuse_non_ids(workspace: Path, tmp_path: Path, seqs: dict, fragment: str):
    json_file(tmp_path / "a" / "A.inter.json", seqs)
    err = fails(workspace, "data", "import", str(tmp_path / "a"), "--format", "amazon-json")
    assert "A.inter.json" in err and fragment in err


def test_amazon_integral_float_ids_are_integers(workspace: Path, tmp_path: Path):
    json_file(tmp_path / "a" / "A.inter.json", {"0": [1.0, "2", 3]})
    ok(workspace, "data", "import", str(tmp_path / "a"), "--format", "amazon-json", "--name", "a")
    assert rows(workspace, "a", "SELECT raw_id FROM items ORDER BY item_id") == [("1",), ("2",), ("3",)]


AMAZON_ITEMS_BAD = [
    ({"title": {"en": "x"}}, "item '1' field 'title'"),
    ({"categories": ["a", {"b": 1}]}, "item '1' field 'categories'"),
    ({"categories": [True]}, "item '1' field 'categories': true is not a tag"),
    ({"details": {"size": 3}}, "item '1' field 'details': a nested dict"),
]


@pytest.mark.parametrize("record,fragment", AMAZON_ITEMS_BAD, ids=["title-object", "category-object",
                                                                   "category-bool", "nested-attr"])
def test_amazon_item_records_refuse_nested_values(workspace: Path, tmp_path: Path, record: dict, fragment: str):
    json_file(tmp_path / "a" / "A.inter.json", {"0": [1]})
    json_file(tmp_path / "a" / "A.item.json", {"1": record})
    err = fails(workspace, "data", "import", str(tmp_path / "a"), "--format", "amazon-json")
    assert "A.item.json" in err and fragment in err


def test_null_tags_are_skipped(workspace: Path, tmp_path: Path):
    json_file(tmp_path / "a" / "A.inter.json", {"0": [1, 2]})
    json_file(tmp_path / "a" / "A.item.json", {"1": {"categories": ["x", None]}, "2": {"categories": None}})
    ok(workspace, "data", "import", str(tmp_path / "a"), "--format", "amazon-json", "--name", "a")
    assert rows(workspace, "a", "SELECT tags FROM items ORDER BY item_id") == [(["x"],), ([],)]
    write(tmp_path / "s.txt", "u1 1 2\n")
    json_file(tmp_path / "attrs.json", {"1": [3, None], "2": None})
    ok(workspace, "data", "import", str(tmp_path / "s.txt"), "--format", "sequence", "--items",
       str(tmp_path / "attrs.json"), "--name", "s")
    assert rows(workspace, "s", "SELECT tags FROM items ORDER BY item_id") == [(["3"],), ([],)]


def test_sequence_attribute_objects_refused(workspace: Path, tmp_path: Path):
    write(tmp_path / "s.txt", "u1 1 2\n")
    json_file(tmp_path / "attrs.json", {"1": [{"id": 2}]})
    err = fails(workspace, "data", "import", str(tmp_path / "s.txt"), "--format", "sequence", "--items",
                str(tmp_path / "attrs.json"))
    assert "attrs.json item '1'" in err and '{"id": 2} is not a tag' in err


PARQUET_BAD = [
    ("interactions", {"user_id": ["a"], "item_id": [{"id": 2}], "timestamp": [1]}, (), "column 'item_id' (--item-col)"),
    ("tags", {"item_id": ["x"], "tag": [{"a": 1}]}, ("--tag-col", "tag"), "column 'tag' (--tag-col)"),
    ("tag-list", {"item_id": ["x"], "tag": [[{"a": 1}]]}, ("--tag-col", "tag"), "column 'tag' (--tag-col)"),
    ("attrs", {"item_id": ["x"], "meta": [{"a": 1}]}, (), "column 'meta' (item attribute)"),
]


@pytest.mark.parametrize("what,data,extra,fragment", PARQUET_BAD, ids=[c[0] for c in PARQUET_BAD])
def test_struct_columns_refused(workspace: Path, tmp_path: Path, what: str, data: dict, extra: tuple, fragment: str):
    if what == "interactions":
        pq.write_table(pa.table(data), tmp_path / "l.parquet")
        args = (str(tmp_path / "l.parquet"), "--format", "long")
    else:
        pq.write_table(pa.table(data), tmp_path / "items.parquet")
        pq.write_table(pa.table({"user_id": ["a"], "item_id": ["x"], "timestamp": [1]}), tmp_path / "l.parquet")
        args = (str(tmp_path / "l.parquet"), "--format", "long", "--items", str(tmp_path / "items.parquet"), *extra)
    err = fails(workspace, "data", "import", *args)
    assert fragment in err and "STRUCT" in err


# --- --force keeps priors, the LLM cache and the stage history ------------------------------------


def _with_prior(ws: Path, tmp_path: Path) -> Path:
    path = long_csv(tmp_path / "e.csv")
    ok(ws, "data", "import", str(path), *LONG, "--name", "d")
    ok(ws, "priors", "build", "--kind", "temporal", "--horizon", "2")
    import duckdb

    con = duckdb.connect(str(ws / "d" / "store.duckdb"))
    con.execute("INSERT INTO llm_cache VALUES ('k1', 'm', 'req', 'resp', now())")
    con.close()
    return path


def test_force_on_the_same_data_keeps_priors_cache_and_history(workspace: Path, tmp_path: Path):
    path = _with_prior(workspace, tmp_path)
    key = meta(workspace, "d")["data_key"]
    ok(workspace, "data", "import", str(path), *LONG, "--name", "d", "--force")
    assert meta(workspace, "d")["data_key"] == key
    assert rows(workspace, "d", "SELECT prior FROM priors") == [("temporal",)]
    assert rows(workspace, "d", "SELECT count(*) FROM horizon_groups") == [(2,)]
    assert rows(workspace, "d", "SELECT key FROM llm_cache") == [("k1",)]
    assert [r[0] for r in rows(workspace, "d", "SELECT stage FROM stage_runs ORDER BY started")] == [
        "data import", "priors", "data import"]
    code, out, err = mhr(workspace, "priors", "build", "--kind", "temporal", "--horizon", "2")
    assert code == 0 and "cached" in err  # still valid: same key, same ids


def test_other_data_over_priors_is_refused_unless_discarded(workspace: Path, tmp_path: Path):
    path = _with_prior(workspace, tmp_path)
    write(path, path.read_text() + "u9,z,1,view\n")
    err = fails(workspace, "data", "import", str(path), *LONG, "--name", "d")
    assert "1 prior(s) (temporal)" in err and "--discard-priors" in err
    assert rows(workspace, "d", "SELECT count(*) FROM interactions") == [(6,)]
    ok(workspace, "data", "import", str(path), *LONG, "--name", "d", "--discard-priors")
    assert rows(workspace, "d", "SELECT count(*) FROM interactions") == [(7,)]
    assert rows(workspace, "d", "SELECT count(*) FROM priors") == [(0,)]
    assert rows(workspace, "d", "SELECT key FROM llm_cache") == [("k1",)]


def test_synth_force_keeps_priors(workspace: Path):
    args = ("data", "synth", "--users", "20", "--items", "10", "--interactions", "200", "--communities", "2")
    ok(workspace, *args)
    ok(workspace, "priors", "build", "--kind", "temporal", "--horizon", "2")
    ok(workspace, *args, "--force")
    assert rows(workspace, "synth", "SELECT prior FROM priors") == [("temporal",)]


# --- damaged archives, u.genre without an id, deep JSON -------------------------------------------


def _ml100k(folder: Path) -> Path:
    write(folder / "u.data", "1\t10\t4\t100\n1\t20\t3\t200\n2\t10\t5\t150\n")
    write(folder / "u.genre", "unknown|0\nAction|1\n")
    write(folder / "u.item", "10|A (1990)|||url|0|1\n20|B (1991)|||url|1|0\n")
    return folder


def test_u_genre_line_without_an_id(workspace: Path, tmp_path: Path):
    folder = _ml100k(tmp_path / "ml")
    write(folder / "u.genre", "unknown|0\nAction\n")
    err = fails(workspace, "data", "import", str(folder), "--format", "movielens")
    assert "u.genre line 2" in err and "'Action' is not 'genre|id'" in err


def test_zip_with_a_bad_crc(workspace: Path, tmp_path: Path):
    folder = _ml100k(tmp_path / "ml-100k")
    archive = tmp_path / "ml.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for f in folder.iterdir():
            z.write(f, f"ml-100k/{f.name}")
    data = bytearray(archive.read_bytes())
    at = data.find(b"1\t10\t4\t100")
    data[at] = ord("9")  # one byte of u.data flipped: its CRC no longer matches
    archive.write_bytes(bytes(data))
    err = fails(workspace, "data", "import", str(archive), "--format", "movielens")
    assert "ml.zip: damaged zip archive" in err and "Bad CRC" in err


def test_deeply_nested_json(workspace: Path, tmp_path: Path):
    write(tmp_path / "a" / "A.inter.json", "[" * 200_000 + "]" * 200_000)
    err = fails(workspace, "data", "import", str(tmp_path / "a"), "--format", "amazon-json")
    assert "nested too deeply" in err


# --- minor classes: ids normalised ---------------------------------------------------------------


def test_ids_are_trimmed_and_integral_floats_unified(workspace: Path, tmp_path: Path):
    write(tmp_path / "e.csv", 'uid,sku,t\n" u1 ",1.0,1\nu1,1,2\nu1," 2 ",3\n')
    write(tmp_path / "items.csv", "sku,title\n1,One\n2.0,Two\n")
    ok(workspace, "data", "import", str(tmp_path / "e.csv"), *LONG, "--items", str(tmp_path / "items.csv"),
       "--name", "d")
    assert rows(workspace, "d", "SELECT raw_id FROM users") == [("u1",)]
    assert rows(workspace, "d", "SELECT raw_id, title FROM items ORDER BY item_id") == [("1", "One"), ("2", "Two")]


@pytest.mark.parametrize("bad", ["u\x001", "u\x071"], ids=["nul", "bell"])
def test_control_bytes_in_ids_are_refused(workspace: Path, tmp_path: Path, bad: str):
    write(tmp_path / "e.csv", f"uid,sku,t\nu1,a,1\n{bad},b,2\n")
    err = fails(workspace, "data", "import", str(tmp_path / "e.csv"), *LONG)
    assert "e.csv line 3" in err and "control character" in err and "'uid'" in err


def test_json_round_trip_of_report(workspace: Path, tmp_path: Path):
    """The import report (now with kept counts) still renders in `data show --json`."""
    _with_prior(workspace, tmp_path)
    ok(workspace, "data", "import", str(tmp_path / "e.csv"), *LONG, "--name", "d", "--force")
    info = json.loads(ok(workspace, "data", "show", "--json"))
    assert info["import_report"]["priors_kept"] == 1 and info["import_report"]["llm_answers_kept"] == 1


# --- minor classes: messages that name the real cause and line -----------------------------------

CSV_CAUSES = [
    ("uid,sku,t\nu1,a,1\nu2,b,2,9\nu3,c,3\n", (), ["bad.csv line 3: 4 fields, the header has 3"]),
    ("uid;sku;t\nu1;a;1\n", ("--delimiter", ","), ["one column 'uid;sku;t'", "looks ';'-separated", "--delimiter ';'"]),
    ("uid,sku,t\nu1,a,1\nu2,b,nan\n", (), ["bad.csv line 3", "NaN, infinite or out of range"]),
    ("uid,sku,t\nu1,a,1\nu2,b,inf\n", (), ["bad.csv line 3", "NaN, infinite or out of range"]),
    ("uid,sku,t\nu1,a,1\nu2,b,1e30\n", (), ["bad.csv line 3", "out of range"]),
    ("uid,sku,t\nu1,a,1\nu2,b,1960-01-01\n", (), ["bad.csv line 3", "before 1970"]),
    ('uid,sku,t,note\nu1,a,1,"two\nlines"\nu2,b,,x\n', (), ["bad.csv line 4", "missing timestamp"]),
    ("uid,sku,t\nu1,a,1\n", ("--item-col", "uid"), ["--user-col and --item-col are both column 'uid'"]),
]


@pytest.mark.parametrize("text,extra,fragments", CSV_CAUSES, ids=[
    "ragged-row", "wrong-delimiter", "nan-ts", "inf-ts", "huge-ts", "before-1970", "quoted-newline", "same-column"])
def test_csv_messages_name_the_cause_and_line(workspace: Path, tmp_path: Path, text: str, extra: tuple,
                                             fragments: list[str]):
    bad = write(tmp_path / "bad.csv", text)
    err = fails(workspace, "data", "import", str(bad), *LONG, *extra)
    for fragment in fragments:
        assert fragment in err, err


def test_non_utf8_bytes_named_with_their_line(workspace: Path, tmp_path: Path):
    (tmp_path / "bad.csv").write_bytes(b"uid,sku,t\nu1,a,1\nu2,\xff\xfeb,2\n")
    err = fails(workspace, "data", "import", str(tmp_path / "bad.csv"), *LONG)
    assert "bad.csv line 3: not UTF-8 text" in err and "iconv" in err


@pytest.mark.parametrize("rating,shown", [("nan", "'nan'"), ("", "missing"), ("inf", "'inf'")])
def test_movielens_bad_ratings(workspace: Path, tmp_path: Path, rating: str, shown: str):
    folder = _ml100k(tmp_path / "ml")
    write(folder / "u.data", f"1\t10\t4\t100\n1\t20\t{rating}\t200\n")
    err = fails(workspace, "data", "import", str(folder), "--format", "movielens")
    assert f"u.data line 2: rating {shown} is not a finite number" in err


def test_paper_same_column_twice(workspace: Path, tmp_path: Path):
    pq.write_table(pa.table({"item_id": [[1, 2]], "timestamp": [[1, 2]]}), tmp_path / "p.parquet")
    err = fails(workspace, "data", "import", str(tmp_path / "p.parquet"), "--format", "paper", "--time-col", "item_id")
    assert "are both column 'item_id'" in err


def test_overlapping_event_buckets(workspace: Path, tmp_path: Path):
    ok(workspace, "data", "import", str(_ml100k(tmp_path / "ml")), "--format", "movielens", "--name", "ml")
    err = fails(workspace, "priors", "build", "--kind", "event", "--buckets", "low:1-3,high:3-5")
    assert "'low' (1-3) and 'high' (3-5) overlap" in err
