"""Data-stage benchmarks: long-CSV import throughput and `data synth` at scale.

    python benchmarks/bench_data.py import --rows 10000000     # writes the CSV first, then times
    python benchmarks/bench_data.py synth --interactions 50000000
    python benchmarks/bench_data.py profile --rows 10000000  # where the import's time goes, per step

`import` generates a long CSV (user, item, ts, event) with DuckDB, then times in this process a
baseline — DuckDB `read_csv` of the same file with the same explicit column types plus `count(*)`
(the least any import must do: parse every row) — and the real `mhr data import` run as a child
process (the CLI, cold start included). It reports interactions/s for both and their ratio.
`synth` runs `mhr data synth` as a child process and reports interactions/s and the child's peak
RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`, the same number `/usr/bin/time -v` prints).
`profile` runs the import's steps in this process (`--reference`: the SQL reference `ingest_sql`)
and prints the seconds of each: input hash, CSV read, each `mhr.data.dense` step, each SQL statement.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb


def make_csv(path: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    con = duckdb.connect()
    con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
    con.execute(f"""
        COPY (SELECT 'u' || (hash(i, 1) % {users}) AS user_id, CAST(hash(i, 2) % {items} AS VARCHAR) AS item_id,
                     1600000000 + i // 7 AS timestamp,
                     CASE WHEN hash(i, 3) % 100 < 90 THEN 'view' WHEN hash(i, 3) % 100 < 98 THEN 'cart' ELSE 'buy' END AS event
              FROM range({rows}) t(i)) TO '{path}' (HEADER, DELIMITER ',')
    """)
    con.close()


def baseline(path: Path) -> float:
    """Seconds for DuckDB to parse the file with explicit types and count it."""
    con = duckdb.connect()
    t = time.perf_counter()
    n = con.execute(
        "SELECT count(*), max(length(user_id)), max(timestamp) FROM read_csv(?, header=true, "
        "columns={'user_id': 'VARCHAR', 'item_id': 'VARCHAR', 'timestamp': 'BIGINT', 'event': 'VARCHAR'})",
        [str(path)],
    ).fetchall()[0][0]
    seconds = time.perf_counter() - t
    con.close()
    assert n > 0
    return seconds


def child(args: list[str]) -> tuple[float, float]:
    """Run `python -m mhr ARGS`; (wall seconds, peak RSS GiB of children so far). Prints the child's
    CPU seconds too: on a shared machine wall time follows the load, CPU time much less."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "mhr", *args], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"child CPU {cpu:.1f}s (user + sys, all threads) for {seconds:.1f}s wall", flush=True)
    return seconds, after.ru_maxrss / 2**20


def bench_import(a: argparse.Namespace) -> None:
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"long-{a.rows}.csv"
    if not csv.is_file():
        t = time.perf_counter()
        make_csv(csv, a.rows, a.users, a.items)
        print(f"wrote {csv} ({csv.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t:.1f}s", flush=True)
    base = baseline(csv)
    seconds, rss = child(["--workspace", str(work / "ws"), "data", "import", str(csv), "--format", "long",
                          "--event-col", "event", "--name", "bench", "--force"])
    print(f"baseline duckdb read_csv+count: {a.rows / base:,.0f} rows/s ({base:.2f}s)")
    print(f"mhr data import (CLI, cold):    {a.rows / seconds:,.0f} interactions/s ({seconds:.2f}s), "
          f"peak RSS {rss:.2f} GiB")
    print(f"ratio import/baseline throughput: {base / seconds:.3f}")


def bench_synth(a: argparse.Namespace) -> None:
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-data-"))
    seconds, rss = child(["--workspace", str(work / "ws"), "data", "synth", "--name", "bench", "--force",
                          "--users", str(a.users), "--items", str(a.items), "--interactions", str(a.interactions)])
    size = (work / "ws" / "bench" / "store.duckdb").stat().st_size / 2**30
    print(f"mhr data synth: {a.interactions:,} interactions in {seconds:.1f}s = {a.interactions / seconds:,.0f}/s, "
          f"peak RSS {rss:.2f} GiB, store {size:.2f} GiB")


def bench_profile(a: argparse.Namespace) -> None:
    """Per-step seconds of one in-process import (same steps as `mhr data import`, no CLI)."""
    from collections import defaultdict

    import mhr.data.dense as dense
    import mhr.data.ingest as ingest
    from mhr.data.long import LongColumns, read_long
    from mhr.data.source import files_sha256
    from mhr.store import new_store

    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"long-{a.rows}.csv"
    if not csv.is_file():
        make_csv(csv, a.rows, a.users, a.items)
    seconds: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)  # process CPU (all threads) in the step

    def timed(label: str, fn):
        def wrapper(*args, **kw):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kw)
            finally:
                seconds[label] += time.perf_counter() - t
                cpu[label] += time.process_time() - c
        return wrapper

    class Timed:  # a connection whose execute() is timed per statement
        def __init__(self, con):
            self._con = con

        def execute(self, sql, *args):
            return timed("sql: " + " ".join(str(sql).split())[:70], self._con.execute)(sql, *args)

        def __getattr__(self, name):
            return getattr(self._con, name)

    for name in ("encode_ids", "check_rows", "rank_ids", "chronological", "duplicates", "user_positions"):
        setattr(dense, name, timed(f"dense.{name}", getattr(dense, name)))
    for name in ("_take_text", "_write_items", "_write_users"):
        setattr(ingest, name, timed(name, getattr(ingest, name)))
    fill = ingest.ingest_sql if a.reference else ingest.ingest
    t0, cpu0 = time.perf_counter(), time.process_time()
    timed("sha256 of the input (stage key)", files_sha256)([csv])
    src = timed("read_long: CSV -> Arrow", read_long)(csv, LongColumns(event="event"))
    store = work / "profile.duckdb"
    t = time.perf_counter()
    with new_store(store) as con:
        timed("ingest (total)", fill)(Timed(con), src)
        t_ckpt = time.perf_counter()
    seconds["store: checkpoint + close"] = time.perf_counter() - t_ckpt
    seconds["store: total"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print(f"{'reference ingest_sql' if a.reference else 'fast ingest'}: {a.rows:,} rows in {total:.2f}s "
          f"= {a.rows / total:,.0f} interactions/s (in process, no CLI start); "
          f"CPU {time.process_time() - cpu0:.1f}s (all threads)")
    print("  wall s   CPU s  step")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{s:8.2f} {cpu.get(label, float('nan')):7.2f}  {label}")
    store.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    i = sub.add_parser("import")
    i.add_argument("--rows", type=int, default=10_000_000)
    i.add_argument("--users", type=int, default=200_000)
    i.add_argument("--items", type=int, default=50_000)
    i.add_argument("--dir", default=None)
    s = sub.add_parser("synth")
    s.add_argument("--interactions", type=int, default=50_000_000)
    s.add_argument("--users", type=int, default=500_000)
    s.add_argument("--items", type=int, default=100_000)
    s.add_argument("--dir", default=None)
    f = sub.add_parser("profile")
    f.add_argument("--rows", type=int, default=10_000_000)
    f.add_argument("--users", type=int, default=200_000)
    f.add_argument("--items", type=int, default=50_000)
    f.add_argument("--dir", default=None)
    f.add_argument("--reference", action="store_true", help="profile the SQL reference ingest_sql instead")
    a = p.parse_args()
    {"import": bench_import, "synth": bench_synth, "profile": bench_profile}[a.what](a)


if __name__ == "__main__":
    main()
