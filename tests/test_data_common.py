"""Helpers shared by the data tests (in-process CLI runs, tiny fixture writers, store reads), and
tests of the small shared pieces of `mhr.data.source`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import duckdb

from mhr.cli import main
from mhr.data.source import TS_INVALID, files_sha256, ts_expr


def mhr(ws: Path, *args: str) -> tuple[int, str, str]:
    """Run `mhr --workspace ws ARGS` in-process through `mhr.cli.main` (as the console script does)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["--workspace", str(ws), *args])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def ok(ws: Path, *args: str) -> str:
    code, out, err = mhr(ws, *args)
    assert code == 0, f"mhr {' '.join(args)} failed ({code}):\n{err}"
    return out


def rows(ws: Path, name: str, sql: str) -> list[tuple]:
    con = duckdb.connect(str(ws / name / "store.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def meta(ws: Path, name: str) -> dict:
    return {k: v for k, v in rows(ws, name, "SELECT key, value FROM meta")}


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def long_csv(path: Path) -> Path:
    """3 users, 4 items, a timestamp tie (u2) broken by row order, raw ids not in row order."""
    return write(path, "\n".join([
        "uid,sku,t,kind",
        "u2,b,100,view",
        "u1,a,50,view",
        "u2,c,100,buy",
        "u1,b,40,like",
        "u10,d,7,view",
        "u10,a,9,view",
    ]) + "\n")


def json_file(path: Path, obj) -> Path:
    return write(path, json.dumps(obj))


def test_ts_expr_parses_numbers_dates_and_flags_the_rest():
    con = duckdb.connect()
    con.execute("CREATE TABLE t(v VARCHAR)")
    con.execute("INSERT INTO t VALUES ('12'), ('12.6'), ('1970-01-02'), (''), (NULL), ('abc'), ('-5')")
    got = [r[0] for r in con.execute(f"SELECT {ts_expr('v')} FROM t").fetchall()]
    assert got == [12, 13, 86400, None, None, TS_INVALID, -5]


def test_files_sha256_depends_on_bytes(tmp_path: Path):
    a = write(tmp_path / "a.csv", "x\n1\n")
    before = files_sha256([a])
    assert files_sha256([a]) == before
    write(a, "x\n2\n")
    assert files_sha256([a]) != before
