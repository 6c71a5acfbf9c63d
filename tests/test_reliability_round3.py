"""Reliability, round three (issue 23): what must never happen to a user's files, and the last
tracebacks. Each class reproduced with a stand-in (a FIFO and a Unix socket under a temp dir for a
device, bytes flipped inside a store, a file-size limit for a full disk), then shown handled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_ws(tmp_path_factory) -> Path:
    """A workspace with one small synthetic dataset made by the CLI (so `--force` can rebuild it)."""
    ws = tmp_path_factory.mktemp("synth") / "ws"
    run_cli("data", "synth", "--users", "50", "--items", "40", workspace=ws)
    return ws


@pytest.fixture
def synth_copy(synth_ws: Path, tmp_path: Path) -> Path:
    shutil.copytree(synth_ws, tmp_path / "ws")
    return tmp_path / "ws"


def _corrupt_table(store: Path, table: str) -> None:
    """Flip bytes in every block that holds `table`'s rows, keeping the file's size."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
        blocks = {r[0] for r in con.execute(
            f"SELECT block_id FROM pragma_storage_info('{table}') WHERE persistent AND block_id >= 0").fetchall()}
    finally:
        con.close()
    assert blocks, f"{table} has no block on disk"
    before = store.stat().st_size
    with open(store, "r+b") as f:
        for b in blocks:
            at = 3 * 4096 + b * size + 64  # past its checksum, inside the rows (a partial block checks its used part)
            f.seek(at)
            data = f.read(16)
            f.seek(at)
            f.write(bytes(x ^ 0x5A for x in data))
    assert store.stat().st_size == before


# --- 2. a store damaged in place ----------------------------------------------------------------

@pytest.mark.parametrize("args", [("data", "show"), ("windows", "build"), ("status",), ("status", "--json")])
def test_store_with_flipped_bytes_is_damaged_for_every_command(synth_copy: Path, args: tuple):
    _corrupt_table(synth_copy / "synth" / "store.duckdb", "interactions")
    proc = run_cli(*args, workspace=synth_copy, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert "store.duckdb" in proc.stderr and "--force" in proc.stderr  # the file, and the way to rebuild


def test_status_does_not_list_the_stages_of_a_damaged_store_as_done(synth_copy: Path):
    _corrupt_table(synth_copy / "synth" / "store.duckdb", "interactions")
    proc = run_cli("status", "--json", workspace=synth_copy, check=False)
    record = json.loads(proc.stdout)[0]
    assert record["store_error"] and "damaged" in record["store_error"]["message"]
    assert record["stages"] == []


@pytest.mark.parametrize("table", ["interactions", "stage_runs"])
def test_the_rebuild_command_replaces_a_damaged_store(synth_copy: Path, table: str):
    store = synth_copy / "synth" / "store.duckdb"
    _corrupt_table(store, table)
    proc = run_cli("data", "synth", "--users", "50", "--items", "40", "--force", workspace=synth_copy, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_cli("data", "show", workspace=synth_copy, check=False).returncode == 0
