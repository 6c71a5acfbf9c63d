"""Graph and user priors at the size of the paper's news dataset (issue 3 §Benchmark).

    python benchmarks/bench_priors.py --dir /tmp/bench-priors            # 45k users, 25k items, 30M
    python benchmarks/bench_priors.py --dir /tmp/bp --interactions 3000000  # a quicker check

Makes the log with `mhr data synth` (planted communities; skipped when the store already has the
same data key), then runs `mhr priors build --kind graph --clusters 20` and `mhr priors build
--kind user --clusters 8` as child processes, each timed and measured (peak RSS of that child,
from /usr/bin/time -v). Goal: ≤ 10 min and ≤ 12 GB each on a 2-core machine. With planted
truth, it also reports the NMI of the recovered communities against `items.attrs.community`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np


def child(args: list[str]) -> tuple[float, float, str]:
    """Run `python -m mhr ARGS` under /usr/bin/time -v: (wall s, peak RSS GiB, stderr)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "mhr", *args]
    print("$ " + " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return seconds, rss_kb / 2**20, proc.stderr


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    p = joint / len(a)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    h = -(pa[pa > 0] * np.log(pa[pa > 0])).sum() - (pb[pb > 0] * np.log(pb[pb > 0])).sum()
    return float(2 * mi / h) if h > 0 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--users", type=int, default=45_000)
    ap.add_argument("--items", type=int, default=25_000)
    ap.add_argument("--interactions", type=int, default=30_000_000)
    ap.add_argument("--communities", type=int, default=20)
    ap.add_argument("--only", choices=("graph", "user"), default=None)
    a = ap.parse_args()
    ws = Path(a.dir) / "ws"
    base = ["--workspace", str(ws), "--dataset", "news"]
    s, rss, _ = child(base[:2] + ["data", "synth", "--name", "news", "--users", str(a.users), "--items",
                                  str(a.items), "--interactions", str(a.interactions), "--communities",
                                  str(a.communities)])
    print(f"synth (or cached): {s:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    results = {}
    runs = {
        "graph": ["priors", "build", "--kind", "graph", "--clusters", str(a.communities), "--force"],
        "user": ["priors", "build", "--kind", "user", "--clusters", "8", "--force"],
    }
    for kind, args in runs.items():
        if a.only and kind != a.only:
            continue
        s, rss, log = child(base + args)
        results[kind] = {"seconds": round(s, 1), "peak_rss_gib": round(rss, 2)}
        print(f"{kind}: {s:.1f} s, peak RSS {rss:.2f} GiB  ({log.splitlines()[0] if log else ''})", flush=True)
    con = duckdb.connect(str(ws / "news" / "store.duckdb"), read_only=True)
    n = con.execute("SELECT count(*) FROM interactions").fetchone()[0]
    if "graph" in results:
        rows = con.execute(
            "SELECT g.item_id, g.group_id, json_extract(i.attrs, '$.community')::INT AS community FROM item_groups g "
            "JOIN items i USING (item_id) WHERE g.prior = 'graph' ORDER BY 1"
        ).fetchnumpy()
        results["graph"]["nmi_vs_planted_communities"] = round(nmi(rows["group_id"], rows["community"]), 3)
        results["graph"]["report"] = json.loads(con.execute("SELECT report FROM priors WHERE prior = 'graph'").fetchone()[0])["graph"]
    if "user" in results:
        results["user"]["report"] = json.loads(con.execute("SELECT report FROM priors WHERE prior = 'user'").fetchone()[0])["graph"]
    con.close()
    print(json.dumps({"interactions": n, **results}, indent=1, default=str))


if __name__ == "__main__":
    main()
