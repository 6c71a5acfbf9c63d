"""`mhr data import` end to end on tiny fixtures written here: every format, ids, pos, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SHARED_DATA
from tests.test_data_common import json_file, long_csv, meta, mhr, ok, rows, write

LONG = ("--format", "long", "--user-col", "uid", "--item-col", "sku", "--time-col", "t", "--event-col", "kind")


def test_long_csv_end_to_end_through_the_real_cli(cli, workspace: Path, tmp_path: Path):
    path = long_csv(tmp_path / "events.csv")
    proc = cli("data", "import", str(path), *LONG, "--name", "shop", workspace=workspace)
    assert proc.stdout == "dataset:shop\n"
    # ids in raw-id order (text order here: u1 < u10 < u2; a < b < c < d)
    assert rows(workspace, "shop", "SELECT user_id, raw_id FROM users ORDER BY 1") == [(1, "u1"), (2, "u10"), (3, "u2")]
    assert rows(workspace, "shop", "SELECT item_id, raw_id FROM items ORDER BY 1") == [
        (1, "a"), (2, "b"), (3, "c"), (4, "d")]
    got = rows(workspace, "shop", "SELECT user_id, item_id, ts, event, pos FROM interactions ORDER BY user_id, pos")
    assert got == [
        (1, 2, 40, "like", 0), (1, 1, 50, "view", 1),            # u1: chronological, not row order
        (2, 4, 7, "view", 0), (2, 1, 9, "view", 1),
        (3, 2, 100, "view", 0), (3, 3, 100, "buy", 1),           # u2: tie at 100 kept in row order
    ]
    m = meta(workspace, "shop")
    assert m["has_timestamps"] == "true" and m["name"] == "shop" and len(m["data_key"]) == 64
    assert rows(workspace, "shop", "SELECT stage, status FROM stage_runs") == [("data import", "done")]
    info = json.loads(cli("--dataset", "shop", "data", "show", "--json", workspace=workspace).stdout)
    assert info["interactions"] == 6 and info["users"] == 3 and info["time_span"]["min"] == 7
    assert {e["event"]: e["count"] for e in info["events"]} == {"view": 4, "like": 1, "buy": 1}


def test_numeric_raw_ids_are_numbered_numerically(workspace: Path, tmp_path: Path):
    write(tmp_path / "n.csv", "user_id,item_id,timestamp\n10,100,1\n9,20,2\n10,3,3\n")
    ok(workspace, "data", "import", str(tmp_path / "n.csv"), "--format", "long", "--name", "n")
    assert rows(workspace, "n", "SELECT raw_id FROM users ORDER BY user_id") == [("9",), ("10",)]
    assert rows(workspace, "n", "SELECT raw_id FROM items ORDER BY item_id") == [("3",), ("20",), ("100",)]


def test_cache_skip_then_new_key_on_option_or_file_change(workspace: Path, tmp_path: Path):
    path = long_csv(tmp_path / "events.csv")
    ok(workspace, "data", "import", str(path), *LONG, "--name", "c")
    key = meta(workspace, "c")["data_key"]
    code, out, err = mhr(workspace, "data", "import", str(path), *LONG, "--name", "c")
    assert code == 0 and out == "dataset:c\n" and "cached" in err
    assert len(rows(workspace, "c", "SELECT * FROM stage_runs")) == 1
    ok(workspace, "data", "import", str(path), *LONG, "--name", "c", "--min-history", "2")
    key2 = meta(workspace, "c")["data_key"]
    assert key2 != key
    write(path, path.read_text() + "u3,a,1,view\n")
    ok(workspace, "data", "import", str(path), *LONG, "--name", "c", "--min-history", "2")
    assert meta(workspace, "c")["data_key"] not in (key, key2)
    _, _, err = mhr(workspace, "data", "import", str(path), *LONG, "--name", "c", "--min-history", "2", "--force")
    assert "cached" not in err


def test_duplicates_are_counted_then_kept_or_dropped(workspace: Path, tmp_path: Path):
    path = write(tmp_path / "d.csv", "user_id,item_id,timestamp\n1,1,5\n1,1,5\n1,2,6\n2,1,5\n")
    code, _, err = mhr(workspace, "data", "import", str(path), "--format", "long", "--name", "keep")
    assert code == 0 and "1 duplicate (user, item, ts) rows" in err
    assert rows(workspace, "keep", "SELECT count(*) FROM interactions") == [(4,)]
    ok(workspace, "data", "import", str(path), "--format", "long", "--name", "drop", "--dedupe", "drop")
    assert rows(workspace, "drop", "SELECT count(*) FROM interactions") == [(3,)]
    assert json.loads(meta(workspace, "drop")["report"])["duplicates_dropped"] == 1


def test_min_history_drops_short_users_with_a_count(workspace: Path, tmp_path: Path):
    path = long_csv(tmp_path / "e.csv")
    write(path, path.read_text() + "u3,a,1,view\n")
    code, _, err = mhr(workspace, "data", "import", str(path), *LONG, "--name", "m", "--min-history", "2")
    assert code == 0 and "1 users shorter than --min-history dropped" in err
    assert rows(workspace, "m", "SELECT raw_id FROM users ORDER BY 1") == [("u1",), ("u10",), ("u2",)]


def test_no_timestamps_keeps_row_order_and_show_says_so(workspace: Path, tmp_path: Path):
    path = write(tmp_path / "s.csv", "user_id,item_id\n1,9\n1,3\n1,9\n2,3\n")
    ok(workspace, "data", "import", str(path), "--format", "long", "--no-time", "--name", "nt")
    assert rows(workspace, "nt", "SELECT item_id, ts, pos FROM interactions WHERE user_id = 1 ORDER BY pos") == [
        (2, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert meta(workspace, "nt")["has_timestamps"] == "false"
    info = json.loads(ok(workspace, "--dataset", "nt", "data", "show", "--json"))
    assert info["note"] == "no timestamps: ts is the position" and info["time_span"] is None
    _, _, err = mhr(workspace, "--dataset", "nt", "data", "show")
    assert "no timestamps: ts is the position" in err


def test_item_table_with_unicode_commas_quotes_and_metadata_counts(workspace: Path, tmp_path: Path):
    path = long_csv(tmp_path / "e.csv")
    items = write(tmp_path / "items.csv", "\n".join([
        "sku,title,brand,category",
        'a,"Amélie, ""Le fabuleux destin"" — 2001",Zoë & Co,"Films,Drama"',
        "b,Plain,Acme,Films",
        "c,日本語のタイトル,,",
        "zz,Never bought,Acme,Films",
    ]) + "\n")
    code, _, err = mhr(workspace, "data", "import", str(path), *LONG, "--name", "it", "--items", str(items),
                       "--item-text-cols", "brand", "--tag-col", "category")
    assert code == 0, err
    assert "1 items in the item table never occur" in err and "1 interacted items have no metadata" in err
    got = rows(workspace, "it", "SELECT raw_id, title, text, tags FROM items ORDER BY item_id")
    assert got == [
        ("a", 'Amélie, "Le fabuleux destin" — 2001', "Zoë & Co", ["Films,Drama"]),
        ("b", "Plain", "Acme", ["Films"]),
        ("c", "日本語のタイトル", None, []),
        ("d", None, None, []),
    ]


def test_parquet_long_with_timestamp_type(workspace: Path, tmp_path: Path):
    import datetime as dt

    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [5, 6],
                             "timestamp": [t0 + dt.timedelta(seconds=10), t0]}), tmp_path / "l.parquet")
    ok(workspace, "data", "import", str(tmp_path / "l.parquet"), "--format", "long", "--name", "pl")
    assert rows(workspace, "pl", "SELECT item_id, pos FROM interactions ORDER BY pos") == [(2, 0), (1, 1)]


def test_paper_parquet_layout(workspace: Path, tmp_path: Path):
    pq.write_table(pa.table({
        "user_id": [7, 3],
        "item_id": [[10, 11, 12], [11]],
        "timestamp": [[3, 1, 2], [5]],
        "event_id": [[0, 1, 0], [2]],
    }), tmp_path / "inter.parquet")
    pq.write_table(pa.table({"item_id": [10, 11, 12, 99], "title": ["Ten", "Eleven", "Twelve", "Unused"],
                             "tag": ["A", "B", "A", "C"], "description": ["ten d", None, "twelve d", "x"]}),
                   tmp_path / "items.parquet")
    ok(workspace, "data", "import", str(tmp_path / "inter.parquet"), "--format", "paper",
       "--items", str(tmp_path / "items.parquet"), "--name", "paper")
    got = rows(workspace, "paper", "SELECT u.raw_id, i.raw_id, ts, event, pos FROM interactions "
               "JOIN users u USING (user_id) JOIN items i USING (item_id) ORDER BY u.raw_id, pos")
    assert got == [("3", "11", 5, "2", 0), ("7", "11", 1, "1", 0), ("7", "12", 2, "0", 1), ("7", "10", 3, "0", 2)]
    assert rows(workspace, "paper", "SELECT raw_id, title, text, tags FROM items ORDER BY item_id") == [
        ("10", "Ten", "ten d", ["A"]), ("11", "Eleven", None, ["B"]), ("12", "Twelve", "twelve d", ["A"])]


def test_sequence_text_with_attribute_map(workspace: Path, tmp_path: Path):
    seq = write(tmp_path / "seq.txt", "1 5 3 5\n\n2 3\n3\n")
    attrs = json_file(tmp_path / "attrs.json", {"5": [1, 2], "3": [2], "8": [9]})
    code, _, err = mhr(workspace, "data", "import", str(seq), "--format", "sequence", "--items", str(attrs), "--name", "sq")
    assert code == 0, err
    assert rows(workspace, "sq", "SELECT raw_id, tags FROM items ORDER BY item_id") == [("3", ["2"]), ("5", ["1", "2"])]
    assert rows(workspace, "sq", "SELECT user_id, item_id, ts, pos FROM interactions ORDER BY user_id, pos") == [
        (1, 2, 0, 0), (1, 1, 1, 1), (1, 2, 2, 2), (2, 1, 0, 0)]
    report = json.loads(meta(workspace, "sq")["report"])
    assert report["items_never_interacted"] == 1 and report["notes"] == ["1 lines with a user id but no items were skipped"]


def test_amazon_json_tiny(workspace: Path, tmp_path: Path):
    folder = tmp_path / "amz"
    json_file(folder / "Tiny.inter.json", {"0": [0, 1, 2], "1": [2, 0], "2": []})
    json_file(folder / "Tiny.item.json", {
        "0": {"title": "Pipette, 10 µL", "description": "A \"precise\" pipette", "brand": "Lab",
              "categories": "Industrial & Scientific,Lab,Pipettes"},
        "1": {"title": "Beaker", "description": "", "brand": "", "categories": "Industrial & Scientific,Lab"},
        "2": {"title": "Gloves", "description": "Nitrile", "brand": "Safe", "categories": ""},
    })
    ok(workspace, "data", "import", str(folder), "--format", "amazon-json")
    assert rows(workspace, "amz", "SELECT raw_id, title, text, tags, attrs FROM items ORDER BY item_id") == [
        ("0", "Pipette, 10 µL", 'A "precise" pipette', ["Industrial & Scientific,Lab,Pipettes"], '{"brand": "Lab"}'),
        ("1", "Beaker", None, ["Industrial & Scientific,Lab"], "{}"),
        ("2", "Gloves", "Nitrile", [], '{"brand": "Safe"}'),
    ]
    assert rows(workspace, "amz", "SELECT user_id, item_id, ts, pos FROM interactions WHERE user_id = 2 ORDER BY pos") == [
        (2, 3, 0, 0), (2, 1, 1, 1)]
    assert meta(workspace, "amz")["has_timestamps"] == "false"


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED_DATA / "amazon-scientific").is_dir(), reason="../shared/data/amazon-scientific absent")
def test_amazon_scientific_real_sample(workspace: Path):
    folder = SHARED_DATA / "amazon-scientific"
    seqs = json.loads((folder / "Scientific.inter.json").read_text())
    ok(workspace, "data", "import", str(folder), "--format", "amazon-json", "--name", "sci")
    n_inter = sum(len(v) for v in seqs.values())
    n_items = len({i for v in seqs.values() for i in v})
    assert rows(workspace, "sci", "SELECT count(*) FROM interactions") == [(n_inter,)]
    assert rows(workspace, "sci", "SELECT count(*) FROM users") == [(sum(1 for v in seqs.values() if v),)]
    assert rows(workspace, "sci", "SELECT count(*) FROM items") == [(n_items,)]
    assert rows(workspace, "sci", "SELECT count(*) FROM items WHERE title IS NULL") == [(0,)]
    info = json.loads(ok(workspace, "--dataset", "sci", "data", "show", "--json"))
    assert info["tags"]["top"][0]["tag"].startswith("Industrial & Scientific")


# --- MovieLens layouts -------------------------------------------------------------------------


def test_movielens_100k_layout_latin1_and_header_detection(workspace: Path, tmp_path: Path):
    folder = tmp_path / "ml-100k"
    write(folder / "u.data", "1\t2\t5\t881250949\n2\t1\t3\t881250950\n1\t1\t4\t881250940\n")
    flags = ["0"] * 19
    toy = flags.copy()
    toy[3] = toy[5] = "1"
    write(folder / "u.item", "\n".join([
        "1|Misérables, Les (1995)|01-Jan-1995||http://x|" + "|".join(toy),
        "2|unknown||||1|" + "|".join(["0"] * 18),
    ]) + "\n", encoding="latin-1")
    write(folder / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    ok(workspace, "data", "import", str(tmp_path / "ml-100k"), "--format", "movielens", "--name", "ml")
    assert rows(workspace, "ml", "SELECT item_id, title, tags, attrs FROM items ORDER BY 1") == [
        (1, "Misérables, Les (1995)", ["Animation", "Comedy"], '{"year": 1995}'), (2, "unknown", ["unknown"], "{}")]
    assert rows(workspace, "ml", "SELECT attrs FROM users WHERE user_id = 2") == [
        ('{"age": 53, "gender": "F", "occupation": "other", "zip": "94043"}',)]
    assert rows(workspace, "ml", "SELECT user_id, item_id, event, pos FROM interactions ORDER BY 1, 4") == [
        (1, 1, "4", 0), (1, 2, "5", 1), (2, 1, "3", 0)]
    # the same ratings with a header row give the same interactions
    write(folder / "u.data", "user\titem\trating\ttimestamp\n" + (folder / "u.data").read_text())
    ok(workspace, "data", "import", str(folder), "--format", "movielens", "--name", "ml2")
    assert rows(workspace, "ml2", "SELECT * FROM interactions ORDER BY 1, 5") == rows(
        workspace, "ml", "SELECT * FROM interactions ORDER BY 1, 5")


def test_movielens_1m_dat_and_csv_layouts(workspace: Path, tmp_path: Path):
    import zipfile

    one = tmp_path / "ml-1m"
    write(one / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(one / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Children's|Musical\n", encoding="latin-1")
    write(one / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in one.iterdir():
            z.write(f, f"ml-1m/{f.name}")
    ok(workspace, "data", "import", str(archive), "--format", "movielens")
    assert rows(workspace, "ml-1m", "SELECT raw_id, tags, attrs FROM items ORDER BY item_id") == [
        ("661", ["Animation", "Children's", "Musical"], '{"year": 1996}'), ("1193", ["Drama"], '{"year": 1975}')]
    assert rows(workspace, "ml-1m", "SELECT attrs FROM users ORDER BY user_id")[0] == (
        '{"age": 1, "gender": "F", "occupation": "K-12 student", "zip": "48067"}',)

    small = tmp_path / "ml-latest-small"
    write(small / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n")
    write(small / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n3,"Grumpier Old Men, The (1995)",(no genres listed)\n')
    ok(workspace, "data", "import", str(small), "--format", "movielens")
    assert rows(workspace, "ml-latest-small", "SELECT i.title, i.tags, x.event FROM interactions x JOIN items i USING (item_id) ORDER BY pos") == [
        ("Grumpier Old Men, The (1995)", [], "3.5"), ("Toy Story (1995)", ["Adventure", "Animation"], "4")]
