"""Bad input: one line naming file/row/column and the fix, non-zero exit, nothing
half-created, the existing dataset untouched; and a crash mid-import leaves the old store."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mhr.data.ingest as ingest_mod
from mhr.data.imports import ImportOptions, import_data
from mhr.workspace import Workspace
from tests.test_data_common import json_file, long_csv, meta, mhr, ok, rows, write

BASE = ("--format", "long", "--user-col", "uid", "--item-col", "sku", "--time-col", "t")


@pytest.fixture
def existing(workspace: Path, tmp_path: Path) -> str:
    """A good dataset `d` whose store must survive every failed import below."""
    ok(workspace, "data", "import", str(long_csv(tmp_path / "good.csv")), *BASE, "--name", "d")
    return meta(workspace, "d")["data_key"]


def assert_untouched(workspace: Path, key: str) -> None:
    assert meta(workspace, "d")["data_key"] == key
    assert rows(workspace, "d", "SELECT count(*) FROM interactions") == [(6,)]
    leftovers = sorted(p.name for p in (workspace / "d").iterdir())
    assert leftovers == [".lock", "store.duckdb"], leftovers


CSV_CASES = [
    # (file text, extra options, expected message fragments)
    ("uid,sku,t\nu1,a,1\n", ("--time-col", "tme"), ["bad.csv: no column 'tme'", "did you mean 't'", "--time-col"]),
    ("user,sku,t\nu1,a,1\n", (), ["bad.csv: no column 'uid'", "--user-col"]),
    ("uid,sku,t\nu1,a,1\nu1,b,yesterday\n", (), ["bad.csv line 3", "not a number or ISO date", "'t'"]),
    ("uid,sku,t\nu1,a,1\nu1,b,\n", (), ["bad.csv line 3", "missing timestamp"]),
    ("uid,sku,t\nu1,a,1\nu2,b,-4\n", (), ["bad.csv line 3", "negative timestamp"]),
    ("uid,sku,t\n,a,1\n", (), ["bad.csv line 2", "empty user id", "'uid'"]),
    ("", (), ["bad.csv is empty"]),
    ("uid,sku,t\n", (), ["bad.csv: header only"]),
    ("uid,sku,t\nu1,a,1\n", ("--min-history", "3"), ["no user has at least 3 interactions", "--min-history"]),
]


@pytest.mark.parametrize("text,extra,fragments", CSV_CASES, ids=[
    "misnamed-time", "missing-user-col", "non-numeric-ts", "missing-ts", "negative-ts", "empty-user",
    "empty-file", "header-only", "all-users-too-short"])
def test_bad_csv(workspace: Path, tmp_path: Path, existing: str, text: str, extra: tuple, fragments: list[str]):
    bad = write(tmp_path / "bad.csv", text)
    code, out, err = mhr(workspace, "data", "import", str(bad), *BASE, *extra, "--name", "d")
    assert code != 0 and out == ""
    first = err.strip().splitlines()[0]
    for fragment in fragments:
        assert fragment in err, err
    assert first.startswith("error:") and "Traceback" not in err
    assert "hint:" in err
    assert_untouched(workspace, existing)


def test_no_half_created_dataset(workspace: Path, tmp_path: Path):
    bad = write(tmp_path / "bad.csv", "uid,sku,t\nu1,a,x\n")
    code, _, _ = mhr(workspace, "data", "import", str(bad), *BASE, "--name", "fresh")
    assert code != 0
    assert not (workspace / "fresh" / "store.duckdb").exists()
    assert [p.name for p in (workspace / "fresh").iterdir()] == [".lock"]


@pytest.mark.parametrize("name", ["a/b", "../up", ".."])
def test_bad_dataset_names(workspace: Path, tmp_path: Path, name: str):
    code, _, err = mhr(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", name)
    assert code == 2 and "invalid dataset name" in err
    assert not any(tmp_path.glob("up")) and list(workspace.iterdir()) == []


def test_truncated_parquet(workspace: Path, tmp_path: Path, existing: str):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"user_id": list(range(1000)), "item_id": list(range(1000)), "timestamp": list(range(1000))}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = mhr(workspace, "data", "import", str(path), "--format", "long", "--name", "d")
    assert code == 2 and "t.parquet: not a readable parquet file" in err and "truncated" in err
    assert_untouched(workspace, existing)


def test_paper_lists_of_different_length(workspace: Path, tmp_path: Path):
    pq.write_table(pa.table({"item_id": [[1, 2], [3]], "timestamp": [[1, 2], [4, 5]]}), tmp_path / "p.parquet")
    code, _, err = mhr(workspace, "data", "import", str(tmp_path / "p.parquet"), "--format", "paper")
    assert code == 2 and "p.parquet row 2: item_id has 1 entries but timestamp has 2" in err


def test_truncated_json(workspace: Path, tmp_path: Path):
    write(tmp_path / "X.inter.json", '{"0": [1, 2], "1": [3')
    code, _, err = mhr(workspace, "data", "import", str(tmp_path / "X.inter.json"), "--format", "amazon-json")
    assert code == 2 and "X.inter.json line 1" in err and "invalid JSON" in err


def test_store_that_is_not_duckdb(workspace: Path):
    write(workspace / "junk" / "store.duckdb", "this is not a database\n")
    code, _, err = mhr(workspace, "--dataset", "junk", "data", "show")
    assert code == 2 and "is not a DuckDB store" in err


def test_import_replaces_a_store_that_is_not_duckdb(workspace: Path, tmp_path: Path):
    write(workspace / "junk" / "store.duckdb", "this is not a database\n")
    ok(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", "junk")
    assert rows(workspace, "junk", "SELECT count(*) FROM interactions") == [(6,)]


def test_unknown_format_and_missing_path(workspace: Path, tmp_path: Path):
    code, _, err = mhr(workspace, "data", "import", str(tmp_path / "nope.csv"), "--format", "long")
    assert code == 2 and "nope.csv: no such file" in err
    code, _, err = mhr(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), "--format", "xml")
    assert code == 2 and "unknown --format 'xml'" in err


def test_crash_mid_import_keeps_the_old_store_and_rerun_completes(workspace: Path, tmp_path: Path, existing: str,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """Interactions and items are written into the temp store, then the import dies."""
    path = write(tmp_path / "new.csv", "uid,sku,t\nu7,x,1\nu7,y,2\n")
    opts = ImportOptions(user_col="uid", item_col="sku", time_col="t")
    ds = Workspace(workspace).dataset("d")

    def boom(con, src):
        assert con.execute("SELECT count(*) FROM interactions").fetchall() == [(2,)]
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ingest_mod, "_write_users", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_data(ds, path, "long", opts)
    assert_untouched(workspace, existing)
    monkeypatch.undo()
    result = import_data(ds, path, "long", opts)
    assert not result.cached and rows(workspace, "d", "SELECT count(*) FROM interactions") == [(2,)]


def test_attribute_map_that_is_not_an_object(workspace: Path, tmp_path: Path):
    seq = write(tmp_path / "s.txt", "1 2 3\n")
    code, _, err = mhr(workspace, "data", "import", str(seq), "--format", "sequence",
                       "--items", str(json_file(tmp_path / "a.json", [1, 2])))
    assert code == 2 and "a.json: expected a JSON object" in err
