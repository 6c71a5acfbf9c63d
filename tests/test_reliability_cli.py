"""Reliability, CLI side: every failure is one red line + hint with a documented exit
code — parse errors 2, Ctrl-C 130, a full disk or a damaged store one line, not a traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

import mhr.windows as windows_mod
from mhr.cli import main
from tests.helpers import make_dataset
from tests.test_data_common import long_csv, mhr

BASE = ("--format", "long", "--user-col", "uid", "--item-col", "sku", "--time-col", "t")


def one_error(err: str, *fragments: str, after_listing: bool = False) -> str:
    """The stderr of a failed command: `error: …` first (after the listing for `status`), a hint, no
    traceback; the fragments in it."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and (after_listing or lines[0] == errors[0]), err
    for fragment in fragments:
        assert fragment in err, err
    return errors[0]


# --- parse errors: exit 2 with the usage, whatever click the installed typer bundles --------------

PARSE_ERRORS = [
    (("windows", "build", "--context", "abc"), "Invalid value for '--context'"),
    (("status", "--bogus"), "No such option: --bogus"),
    (("bogus",), "No such command 'bogus'"),
    (("data", "import"), "Missing argument"),
    (("eval", "RUN", "--k", "abc"), "--k 'abc': 'abc' is not an integer"),
    (("recommend", "RUN", "--user", "1", "--top", "0"), "Invalid value for '--top'"),
    (("data", "synth", "--users", "many"), "Invalid value for '--users'"),
]


@pytest.mark.parametrize("args,fragment", PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_parse_errors_exit_2_with_one_line(workspace: Path, args: tuple, fragment: str):
    make_dataset(workspace, with_priors=False)
    code, out, err = mhr(workspace, *args)
    assert code == 2 and out == ""
    one_error(err, fragment, "hint:")


def test_parse_error_through_the_console_script(cli, workspace: Path):
    proc = cli("windows", "build", "--context", "abc", workspace=workspace, check=False)
    assert proc.returncode == 2
    one_error(proc.stderr, "--context", "usage: mhr windows build")


def test_help_documents_the_exit_codes(workspace: Path):
    code, out, _ = mhr(workspace, "--help")
    assert code == 0
    text = " ".join(out.split())
    for fragment in ("0 ok", "1 unexpected", "2 bad usage or bad input", "3 not found", "4 busy", "5 stale",
                     "6 training", "7 external", "130 interrupted"):
        assert fragment in text, text


# --- Ctrl-C: exit 130 with one line ---------------------------------------------------------------


def test_keyboard_interrupt_exits_130(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mhr.data.ingest as ingest_mod

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "_write_items", ctrl_c)
    code, out, err = mhr(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", "d")
    assert code == 130 and out == ""
    assert err.strip().splitlines() == ["interrupted: nothing half-written was kept; rerun to complete"]
    assert not (workspace / "d" / "store.duckdb").exists()


def test_duckdb_interrupt_turned_into_another_error_still_exits_130(workspace: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """DuckDB reports Ctrl-C mid-query as InterruptException, which readers wrap in InputError."""
    import mhr.data.long as long_mod

    real = long_mod.relation_sql

    def interrupted(con, *args, **kwargs):
        con.interrupt()
        try:
            raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")
        except duckdb.Error:
            from mhr.errors import InputError

            raise InputError("e.csv: cannot read (INTERRUPT Error: Interrupted!)") from None

    monkeypatch.setattr(long_mod, "relation_sql", interrupted)
    code, _, err = mhr(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", "d")
    monkeypatch.setattr(long_mod, "relation_sql", real)
    assert code == 130 and "interrupted" in err


def test_sigint_during_a_long_synth_exits_130(workspace: Path):
    """`kill -INT` of a running `mhr data synth` (as Ctrl-C would): 130, one line, no temp store left."""
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mhr", "--workspace", str(workspace), "data", "synth", "--users", "200000",
         "--items", "5000", "--interactions", "40000000", "--name", "big"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # Ctrl-C reaches a process whose SIGINT is at its default; a test run started in the
        # background of a non-interactive shell inherits it ignored (and Python then keeps it so)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list((workspace / "big").glob(".store.duckdb.tmp-*")):
            time.sleep(0.05)
        # at once: the whole synth takes ~10 s, and on a loaded machine a later signal could arrive
        # after it finished (a clean-clone CI run under load saw exit 0 that way)
        assert proc.poll() is None, "the synth ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted")
    assert sorted(p.name for p in (workspace / "big").iterdir()) == [".lock"]


# --- one-line errors for system failures; bugs keep their traceback -------------------------------


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_windows_build_is_one_line(workspace: Path, monkeypatch: pytest.MonkeyPatch, code_: int):
    make_dataset(workspace, with_priors=False)

    def full(con, sql, schema, path, on_batch=None):
        raise OSError(code_, os.strerror(code_), str(path))

    monkeypatch.setattr(windows_mod, "_write", full)
    code, out, err = mhr(workspace, "windows", "build", "--context", "8", "--horizon", "2")
    assert code == 1 and out == ""
    one_error(err, os.strerror(code_), ".parquet", "free some space")
    assert not any(p.is_dir() and not p.name.startswith(".")
                   for p in (workspace / "tiny" / "windows").glob("*")), "a half-written windows folder was kept"
    code, _, err = mhr(workspace, "--verbose", "windows", "build", "--context", "8", "--horizon", "2")
    assert code == 1 and "Traceback" in err


def test_disk_full_during_import_keeps_nothing(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mhr.data.ingest as ingest_mod

    def full(con, src):
        raise duckdb.IOException(f'IO Error: Could not write file "{workspace}/d/.store.duckdb.tmp-1": '
                                 "No space left on device")

    monkeypatch.setattr(ingest_mod, "_write_items", full)
    code, _, err = mhr(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", "d")
    assert code == 1
    one_error(err, "No space left on device", "free some space")
    assert sorted(p.name for p in (workspace / "d").iterdir()) == [".lock"]


def test_a_genuine_bug_keeps_its_traceback(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    import mhr.data.show as show_mod

    make_dataset(workspace, with_priors=False)

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(show_mod, "describe", bug)
    with pytest.raises(ZeroDivisionError):
        main(["--workspace", str(workspace), "data", "show"])


def test_workspace_that_is_a_file(workspace: Path, tmp_path: Path):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    code, _, err = mhr(path, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", "d")
    assert code == 2
    one_error(err, str(path), "not a folder")
    code, _, err = mhr(path, "status")
    assert code == 2 and "not a folder" in err


def test_workspace_that_cannot_be_written(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mhr.workspace as ws_mod

    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if str(self).startswith(str(workspace)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(ws_mod.Path, "mkdir", denied)
    code, _, err = mhr(workspace, "data", "import", str(long_csv(tmp_path / "e.csv")), *BASE, "--name", "d")
    assert code == 1
    one_error(err, "cannot write", str(workspace), "Permission denied")


# --- a store truncated mid-file -------------------------------------------------------------------


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("args", [("status",), ("data", "show"), ("priors", "build", "--kind", "item"),
                                  ("windows", "build", "--context", "8", "--horizon", "2")],
                         ids=["status", "show", "priors", "windows"])
def test_truncated_store_is_reported_as_damaged(workspace: Path, args: tuple, keep: float):
    ds = make_dataset(workspace, n_users=300)
    _truncate(ds.store_path, keep)
    code, out, err = mhr(workspace, *args)
    assert code == 2, err
    one_error(err, "store.duckdb is damaged", "rebuild it", "--force", after_listing=args == ("status",))


def test_truncated_store_in_eval_and_recommend(workspace: Path, tmp_path: Path):
    """Any command opening the store goes through the same check (eval, recommend need a run: the
    check happens when the store is opened, before the run is looked at)."""
    ds = make_dataset(workspace, n_users=300)
    _truncate(ds.store_path, 0.5)
    for args in (("eval", "nope"), ("recommend", "nope", "--user", "u1")):
        code, _, err = mhr(workspace, *args)
        assert code in (2, 3), err
        assert "Traceback" not in err


def test_status_json_marks_a_damaged_store(workspace: Path):
    """`status --json` still lists every dataset, the damaged one with its error; exit 2."""
    import json

    ds = make_dataset(workspace, n_users=300)
    make_dataset(workspace, name="good", n_users=5, with_priors=False)
    _truncate(ds.store_path, 0.5)
    code, out, err = mhr(workspace, "status", "--json")
    assert code == 2 and "dataset tiny:" in err and "is damaged" in err
    records = {r["dataset"]: r for r in json.loads(out)}
    assert "is damaged" in records["tiny"]["store_error"]["message"]
    assert "store_error" not in records["good"]


def test_read_only_store_is_not_called_foreign(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    import mhr.store as store_mod

    ds = make_dataset(workspace, with_priors=False)
    real = duckdb.connect

    def denied(path, read_only=False, **kw):
        if not read_only:
            raise duckdb.IOException(f'IO Error: Cannot open file "{path}": Permission denied')
        return real(path, read_only=read_only, **kw)

    monkeypatch.setattr(store_mod.duckdb, "connect", denied)
    code, _, err = mhr(workspace, "priors", "build", "--kind", "item")
    first = one_error(err, "permission denied", "chmod")
    assert "not a DuckDB store" not in err and "remove the file" not in err
    assert code == 1 and str(ds.store_path) in first


def test_store_that_is_not_duckdb_still_says_so(workspace: Path):
    (workspace / "junk").mkdir()
    (workspace / "junk" / "store.duckdb").write_text("not a database\n")
    code, _, err = mhr(workspace, "--dataset", "junk", "data", "show")
    assert code == 2 and "is not a DuckDB store" in err
