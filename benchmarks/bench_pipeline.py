"""The whole pipeline at scale: every stage through the real CLI, timed.

    python benchmarks/bench_pipeline.py            # full: 20M interactions, 200k users, 500k items
    python benchmarks/bench_pipeline.py --quick    # 1M interactions, 20k users, 50k items (minutes)
    python benchmarks/bench_pipeline.py --tiny     # seconds; what tests/test_bench_pipeline.py runs
    python benchmarks/bench_pipeline.py --quick --json out.json --dir /tmp/pipe

Stages, each a child process `python -m mhr --workspace <dir>/ws …` on dataset `pipe`:

1. synth     `mhr data synth` with planted communities and categories;
2. export    the synth store's interactions (raw ids, ts, event; the first `csv_rows` in time
             order) to a long CSV with DuckDB COPY (a `python -c` child);
3. import    `mhr data import <csv> --format long` into a second dataset `csv`;
4. graph     `mhr priors build --kind graph --clusters C` on `pipe`;
5. windows   `mhr windows build` (T 50, τ 8);
6. train     HSTU size 1 with the graph heads, 256 sampled negatives per position, a fixed
             number of steps; seq/s is the trainer's own figure at the step before the last (the
             last step also validates, on a 2,000-user sample (`--valid-users`), in the wall time);
7. eval      `mhr eval`: every test user (a seeded sample of 100 in --tiny, `--sample-users`),
             each ranked over the full catalogue;
8. recommend `mhr recommend RUN --all --out recs.parquet` for every user.

Wall time is the child's; peak RSS is the child's own `ru_maxrss` from `os.wait4`. This process
imports nothing heavy, so the high-water mark a forked child inherits from it stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Size:
    interactions: int
    users: int
    items: int
    csv_rows: int
    communities: int
    categories: int
    steps: int
    batch: int = 64
    negatives: int = 256
    backbone_size: str = "1"
    eval_users: int | None = None  # `mhr eval --sample-users`: a seeded sample; None: the whole test split
    valid_users: int = 2_000  # `mhr train --valid-users`: the validation after the last step


SIZES = {
    "full": Size(20_000_000, 200_000, 500_000, 10_000_000, communities=20, categories=20, steps=200),
    "quick": Size(1_000_000, 20_000, 50_000, 1_000_000, communities=10, categories=12, steps=20),
    "tiny": Size(20_000, 400, 1_000, 10_000, communities=4, categories=6, steps=2, batch=16, negatives=32,
                 backbone_size="tiny", eval_users=100, valid_users=50),
}
RSS_GOAL_GIB = 8.0

EXPORT = """
import sys, duckdb
store, csv, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = duckdb.connect(store, read_only=True)
con.execute(f'''COPY (SELECT u.raw_id AS user_id, i.raw_id AS item_id, x.ts AS timestamp, x.event
                     FROM interactions x JOIN users u USING (user_id) JOIN items i USING (item_id)
                     ORDER BY x.ts, x.user_id, x.pos LIMIT {n})
               TO '{csv.replace("'", "''")}' (HEADER, DELIMITER ',')''')
"""


@dataclass
class Stage:
    name: str
    seconds: float
    peak_rss_gib: float
    throughput: float | None = None
    unit: str = ""
    note: str = ""
    ok: bool = True


def run_child(argv: list[str], log: Path, stop_when=None) -> tuple[float, float, int, str]:
    """(wall s, the child's peak RSS GiB, exit code, stdout); stderr appended to `log`.
    `stop_when()`, polled every 2 s, ends the child (SIGTERM) once it returns true."""
    t = time.perf_counter()
    with open(log, "ab") as err:
        err.write(("\n$ " + " ".join(argv) + "\n").encode())
        err.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL if stop_when else subprocess.PIPE, stderr=err)
        out, done = "", None
        if stop_when:
            while (done := os.wait4(proc.pid, os.WNOHANG))[0] == 0 and not stop_when():
                time.sleep(2)
            if done[0] == 0:
                proc.send_signal(signal.SIGTERM)
                done = None
        else:
            out = proc.stdout.read().decode() if proc.stdout else ""
        _, status, usage = done or os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss / 2**20, proc.returncode, out


def train_seq_per_s(ws: Path, run: str) -> float | None:
    """The trainer's seq/s at the last step that did not validate (log.jsonl of the run)."""
    logs = list(ws.glob(f"*/runs/{run}/log.jsonl"))
    if not logs:
        return None
    entries = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
    plain = [e for e in entries if "valid_ndcg@10" not in e] or entries
    return plain[-1].get("seq_per_s") if plain else None


def _logged_steps(ws: Path, run: str) -> int:
    logs = list(ws.glob(f"*/runs/{run}/log.jsonl"))
    return len(logs[0].read_text().splitlines()) if logs else 0


def pipeline(size: Size, work: Path, log: Path, only: set[str] | None = None,
             stop_before_validation: bool = False, priors: str = "graph") -> list[Stage]:
    ws = work / "ws"
    mhr = [sys.executable, "-m", "mhr", "--workspace", str(ws)]
    on = [*mhr, "--dataset", "pipe"]
    csv, recs, run = work / "pipe.csv", work / "recs.parquet", "pipe-hstu"
    n_csv = min(size.csv_rows, size.interactions)
    steps: list[tuple[str, list[str], float, str]] = [
        ("synth", [*mhr, "data", "synth", "--name", "pipe", "--users", str(size.users), "--items", str(size.items),
                   "--interactions", str(size.interactions), "--communities", str(size.communities),
                   "--categories", str(size.categories), "--seed", "0", "--force"],
         size.interactions, "interactions/s"),
        ("export", [sys.executable, "-c", EXPORT, str(ws / "pipe" / "store.duckdb"), str(csv), str(n_csv)],
         n_csv, "rows/s"),
        ("import", [*mhr, "data", "import", str(csv), "--format", "long", "--event-col", "event", "--name", "csv",
                    "--force"], n_csv, "interactions/s"),
        ("graph", [*on, "priors", "build", "--kind", "graph", "--clusters", str(size.communities), "--force"],
         size.interactions, "interactions/s"),
        ("windows", [*on, "windows", "build", "--force"], size.interactions, "interactions/s"),
        ("train", [*on, "train", "--backbone", "hstu", "--size", size.backbone_size, "--priors", priors,
                   "--negatives", str(size.negatives), "--negatives-per", "position", "--max-steps", str(size.steps),
                   "--batch-size", str(size.batch), "--valid-users", str(size.valid_users), "--name", run], 0, "seq/s"),
        ("eval", [*on, "eval", run, *(["--sample-users", str(size.eval_users)] if size.eval_users else []),
                  "--json", "--force"], size.users, "users/s"),
        ("recommend", [*on, "recommend", run, "--all", "--out", str(recs)], size.users, "users/s"),
    ]
    stages = []
    for name, argv, amount, unit in steps:
        if only and name not in only:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} …", file=sys.stderr, flush=True)
        stop = None
        if name == "train" and stop_before_validation:
            stop = lambda: _logged_steps(ws, run) >= size.steps - 1  # noqa: E731
        seconds, rss, code, out = run_child(argv, log, stop)
        stopped = stop is not None and code == -signal.SIGTERM
        stage = Stage(name, seconds, rss, amount / seconds if amount else None, unit, ok=code == 0 or stopped)
        if stopped:
            stage.throughput = train_seq_per_s(ws, run)
            stage.note = (f"{_logged_steps(ws, run)} of {size.steps} steps × {size.batch}; stopped before the "
                          "final validation (no weights saved)")
        elif code != 0:
            stage.note = f"exit {code} (see {log})"
        elif name == "train":
            stage.throughput = train_seq_per_s(ws, run)
            stage.note = f"{size.steps} steps × {size.batch}; wall includes one validation of {size.valid_users:,} users"
        elif name == "eval":
            users = json.loads(out)["metrics"].get("users") if out.strip().startswith("{") else None
            stage.throughput = users / seconds if users else None
            whole = f"{size.eval_users:,}-user sample of" if size.eval_users else "the whole"
            stage.note = f"{whole} test split ({users} users with targets), full catalogue of {size.items:,}"
        elif name == "recommend":
            stage.note = f"top 10 for all {size.users:,} users"
        stages.append(stage)
        print(f"    {seconds:.1f}s, peak RSS {rss:.2f} GiB{'' if stage.ok else ' FAILED'}", file=sys.stderr, flush=True)
    return stages


def table(stages: list[Stage]) -> str:
    lines = ["| stage | wall s | peak RSS GiB | throughput | note |", "|---|---|---|---|---|"]
    for s in stages:
        tp = f"{s.throughput:,.0f} {s.unit}" if s.throughput is not None else "—"
        rss = f"{s.peak_rss_gib:.2f}" + (" **over 8**" if s.peak_rss_gib > RSS_GOAL_GIB else "")
        lines.append(f"| {s.name} | {s.seconds:.1f} | {rss} | {tp} | {s.note if s.ok or s.note else 'failed'} |")
    if stages:
        worst = max(s.peak_rss_gib for s in stages)
        lines.append(f"| **total** | **{sum(s.seconds for s in stages):.1f}** ({sum(s.seconds for s in stages) / 60:.1f} min) "
                     f"| {worst:.2f} (largest stage) | | {'all stages ok' if all(s.ok for s in stages) else 'FAILED'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1M interactions, 20k users, 50k items, 20 steps")
    mode.add_argument("--tiny", action="store_true", help="seconds: the test's configuration")
    p.add_argument("--dir", default=None, help="work folder (default: a new temp dir)")
    p.add_argument("--json", default=None, help="also write the stages as JSON here")
    p.add_argument("--only", default=None, help="comma-separated stages (each needs the earlier ones' outputs)")
    p.add_argument("--train-priors", default="graph", help="--priors of the train stage ('' = plain backbone)")
    p.add_argument("--stop-before-validation", action="store_true",
                   help="end the train child once its second-to-last step is logged: the step rate and "
                        "peak RSS of training without the final validation over every user (no weights "
                        "are saved, so eval and recommend cannot follow)")
    a = p.parse_args(argv)
    kind = "tiny" if a.tiny else "quick" if a.quick else "full"
    size = SIZES[kind]
    work = Path(a.dir or tempfile.mkdtemp(prefix=f"bench-pipeline-{kind}-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "stderr.log"
    print(f"{kind}: {size} in {work} (child stderr: {log})", file=sys.stderr, flush=True)
    stages = pipeline(size, work, log, set(a.only.split(",")) if a.only else None, a.stop_before_validation,
                      a.train_priors)
    print(table(stages))
    if a.json:
        Path(a.json).write_text(json.dumps({"mode": kind, "size": asdict(size), "cpus": os.cpu_count(),
                                            "stages": [asdict(s) for s in stages]}, indent=1))
    return 0 if all(s.ok for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
