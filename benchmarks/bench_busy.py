"""Train, eval and export beside other work: speed with busy single-thread processes beside the command
against the same command alone, run back to back in this process's session.

    python benchmarks/bench_busy.py --dir /tmp/bench-busy                 # 2 busy loops, 3 configurations
    python benchmarks/bench_busy.py --dir /tmp/bench-busy --busy 1 --rounds 1 --only export

Setup (once, cached in --dir): `mhr data synth` (--users users, 50k items), `mhr windows build`, one
short `mhr train` run. Workloads, each the real command as a child process:
  train   mhr train --max-steps 4 --negatives 256 (validation on 200 users) --force
  eval    mhr eval RUN --sample-users U --force           (full-catalogue ranking of U test users)
  export  mhr recommend RUN --all --out recs.parquet      (every user, top 10)
Configurations (environment of the child; OMP_NUM_THREADS is removed first):
  torch default   MHR_THREADS = every core: what `mhr` did before (one intra-op thread per core)
  passive wait    the same with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning)
  free cores      nothing set: `mhr.threads.choose_threads` (the cores other processes leave free now,
                  `mhr.threads.busy_now`)
Each (workload, configuration) is timed quiet, then with --busy `python -c 'while True: pass'` loops
started by this script (they run for the measurement only), --rounds times, alternating; printed: the
median wall seconds and speed ratio busy / quiet (goal ≥ 0.4), with the other processes seen running
(`mhr.threads.busy_now`) before each measurement. Other sessions on a shared machine add their own load to both: compare only
within one run, and read the load column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mhr.threads import busy_now

CONFIGS = {
    "torch default": {"MHR_THREADS": str(len(os.sched_getaffinity(0)))},
    "passive wait": {"MHR_THREADS": str(len(os.sched_getaffinity(0))), "OMP_WAIT_POLICY": "PASSIVE"},
    "free cores": {},
}


def mhr(ws: Path, args: list[str], extra: dict[str, str] | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MHR_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra or {})
    cmd = [sys.executable, "-m", "mhr", "--workspace", str(ws), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def setup(ws: Path, users: int, items: int) -> None:
    if (ws / "busy" / "runs" / "base" / "manifest.json").is_file():
        return
    mhr(ws, ["data", "synth", "--name", "busy", "--users", str(users), "--items", str(items),
             "--interactions", str(users * 100), "--communities", "20"])
    mhr(ws, ["-d", "busy", "windows", "build"])
    mhr(ws, ["-d", "busy", "train", "--max-steps", "2", "--negatives", "256", "--valid-users", "100",
             "--name", "base"])


def workloads(ws: Path, users: int) -> dict[str, list[str]]:
    return {
        "train": ["-d", "busy", "train", "--max-steps", "4", "--negatives", "256", "--valid-users", "200",
                  "--name", "busytrain", "--force"],
        "eval": ["-d", "busy", "eval", "base", "--sample-users", str(min(users, 2000)), "--force"],
        "export": ["-d", "busy", "recommend", "base", "--all", "--out", str(ws / "recs.parquet")],
    }


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--busy", type=int, default=2, help="busy single-thread loops beside the command")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated workloads (train, eval, export)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations")
    a = ap.parse_args()
    ws = a.dir / "ws"
    setup(ws, a.users, a.items)
    jobs = workloads(ws, a.users)
    names = [n for n in jobs if not a.only or n in a.only.split(",")]
    configs = [c for c in CONFIGS if c in a.configs.split(",")]
    print(f"{len(os.sched_getaffinity(0))} CPUs, {a.busy} busy loops, {a.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in names:
        for config in configs:
            quiet, busy, loads = [], [], []
            for _ in range(a.rounds):
                loads.append(busy_now())
                quiet.append(mhr(ws, jobs[name], CONFIGS[config]))
                procs = start_busy(a.busy)
                try:
                    time.sleep(1.0)
                    loads.append(busy_now())
                    busy.append(mhr(ws, jobs[name], CONFIGS[config]))
                finally:
                    stop(procs)
            q, b = statistics.median(quiet), statistics.median(busy)
            rows.append((name, config, q, b, min(loads), max(loads)))
            print(f"{name:6s} {config:14s} quiet {q:6.1f} s  busy {b:6.1f} s  speed busy/quiet {q / b:.2f}  "
                  f"(runs {[round(x, 1) for x in quiet]} / {[round(x, 1) for x in busy]}; load {min(loads):.1f}-"
                  f"{max(loads):.1f})", flush=True)
    print("\n| workload | threads | quiet s | busy s | speed busy / quiet | other processes running (busy_now) |"
          "\n|---|---|---|---|---|---|")
    for name, config, q, b, lo, hi in rows:
        print(f"| {name} | {config} | {q:.1f} | {b:.1f} | **{q / b:.2f}** | {lo:.1f}–{hi:.1f} |")


if __name__ == "__main__":
    main()
