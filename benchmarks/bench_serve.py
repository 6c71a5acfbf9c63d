"""`mhr serve` under concurrent clients, against the in-process `Recommender` on the same requests.

    nice -n 10 python benchmarks/bench_serve.py                 # 2k users, 3k items, HSTU size 1
    python benchmarks/bench_serve.py --quick                    # seconds: a smoke run
    python benchmarks/bench_serve.py --clients 1,8,32 --requests 400 --json out.json

Steps: a synthetic dataset (`mhr data synth`), a graph prior, windows and a briefly trained HSTU
with graph heads (the weights do not matter to speed), each through the real CLI. Then:

- in process, one request at a time (histories read from the store beforehand, not timed):
  `Recommender.recommend(history, top=10, timestamps=…, user=…)` as a caller writes it (it looks the
  user up in the store on every call), and the baseline of the ratios, the ranking alone:
  `Recommender.rank_encoded` of one pre-encoded history, its user id looked up beforehand;
- served: `mhr serve` in a child process; C client threads, each on its own keep-alive connection,
  send `GET /recommend?user=U&k=10` for the same users. requests/s over the wall time of the level,
  p50/p99 of the per-request latency, and the mean number of requests per scoring call (from
  `/health`): the micro-batcher's doing.

Both sides run torch on one thread (OMP_NUM_THREADS=1), and the clients share the machine with the
server, so on a small box the served figures include the clients' own cost. Peak memory: the
server's VmHWM, and this process's ru_maxrss (the baseline) minus what it held before loading.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"full": dict(users=2000, items=3000, interactions=100_000, size="1", steps=4, requests=400),
         "quick": dict(users=200, items=300, interactions=8_000, size="tiny", steps=2, requests=60)}


def cli(ws: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "mhr", "--workspace", str(ws), *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def build(ws: Path, size: dict) -> None:
    cli(ws, "data", "synth", "--name", "bench", "--users", str(size["users"]), "--items", str(size["items"]),
        "--interactions", str(size["interactions"]), "--communities", "8", "--categories", "8", "--seed", "0")
    on = ("--dataset", "bench")
    cli(ws, *on, "priors", "build", "--kind", "graph", "--clusters", "8")
    cli(ws, *on, "windows", "build")
    cli(ws, *on, "train", "--backbone", "hstu", "--size", size["size"], "--priors", "graph", "--max-steps",
        str(size["steps"]), "--batch-size", "32", "--valid-users", "50", "--name", "served")


def requests_for(ws: Path, n: int) -> list[tuple[str, list[str], list[int]]]:
    """(raw user, raw item history, timestamps) of the first n users, in store order."""
    from mhr.store import connect

    con = connect(ws / "bench" / "store.duckdb", read_only=True)
    rows = con.execute("SELECT u.raw_id, list(i.raw_id ORDER BY x.pos), list(x.ts ORDER BY x.pos) "
                       "FROM interactions x JOIN users u USING (user_id) JOIN items i USING (item_id) "
                       "WHERE x.user_id <= ? GROUP BY u.raw_id, x.user_id ORDER BY x.user_id", [n]).fetchall()
    con.close()
    return [(r[0], list(r[1]), [int(t) for t in r[2]]) for r in rows]


def baseline(ws: Path, reqs: list) -> tuple[dict, dict]:
    """(`Recommender.recommend` per request as a caller writes it, the ranking alone per request:
    `rank_encoded` of one pre-encoded history with its user id looked up beforehand)."""
    import torch

    from mhr.ranking.service import Recommender
    from mhr.serve.catalogue import Catalogue

    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rec = Recommender.load(ws, "bench", "served")
    rec.recommend(reqs[0][1], 10, timestamps=reqs[0][2], user=reqs[0][0])  # warm-up
    api = _timed([lambda r=r: rec.recommend(r[1], 10, timestamps=r[2], user=r[0]) for r in reqs])
    cat = Catalogue.load(rec.dataset)
    encoded = [(rec.encode(items, ts), cat.user(user)) for user, items, ts in reqs]
    bare = _timed([lambda e=e: rec.rank_encoded([e[0]], [e[1]], 10) for e in encoded])
    api["peak_mib"] = bare["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return api, bare


def _timed(calls: list) -> dict:
    lat = []
    start = time.perf_counter()
    for call in calls:
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    return {"rps": len(calls) / (time.perf_counter() - start), **_percentiles(lat)}


def _percentiles(lat: list[float]) -> dict:
    s = sorted(lat)
    return {"p50_ms": 1000 * s[len(s) // 2], "p99_ms": 1000 * s[min(len(s) - 1, int(0.99 * len(s)))]}


def start_server(ws: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mhr", "--workspace", str(ws), "--dataset", "bench", "serve",
                             "served", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mhr serve exited: {proc.stderr.read().decode()}") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mhr serve did not start")


def health(port: int) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())


def served_level(port: int, users: list[str], clients: int, n: int) -> dict:
    """n GET /recommend requests (users cycled) from `clients` threads on keep-alive connections."""
    paths = [f"/recommend?user={users[i % len(users)]}&k=10" for i in range(n)]
    lat: list[float] = []
    lock, cursor = threading.Lock(), iter(paths)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        while True:
            with lock:
                path = next(cursor, None)
            if path is None:
                break
            t = time.perf_counter()
            conn.request("GET", path)
            res = conn.getresponse()
            body = res.read()
            if res.status != 200:
                raise RuntimeError(f"{path}: {res.status} {body[:200]!r}")
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            lat.extend(mine)

    before = health(port)["batches"]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = health(port)["batches"]
    calls = after["calls"] - before["calls"]
    return {"clients": clients, "rps": len(lat) / wall, **_percentiles(lat),
            "per_call": (after["requests"] - before["requests"]) / max(calls, 1)}


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: by size)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    n = args.requests or size["requests"]
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ws = work / "ws"
    if not (ws / "bench" / "runs" / "served" / "manifest.json").is_file():
        build(ws, size)
    reqs = requests_for(ws, min(n, size["users"]))
    users = [u for u, _, _ in reqs]
    api, base = baseline(ws, [reqs[i % len(reqs)] for i in range(n)])
    server = start_server(ws, args.port)
    try:
        served_level(args.port, users, 1, min(20, n))  # warm-up
        levels = [served_level(args.port, users, int(c), n) for c in args.clients.split(",")]
        peak = vm_hwm_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{size['users']} users, {size['items']} items, HSTU size {size['size']} + graph heads (8), k = 10, "
          f"{n} requests a level, torch threads 1")
    print(f"in-process Recommender.recommend(history, user=…), one at a time: {api['rps']:.1f} req/s, "
          f"p50 {api['p50_ms']:.1f} ms, p99 {api['p99_ms']:.1f} ms")
    print(f"in-process ranking alone (Recommender.rank_encoded, one history a call): {base['rps']:.1f} req/s, "
          f"p50 {base['p50_ms']:.1f} ms, p99 {base['p99_ms']:.1f} ms; peak +{base['peak_mib']:.0f} MiB")
    print("| clients | req/s | × ranking alone | p50 (ms) | p99 (ms) | requests per scoring call |")
    print("|---|---|---|---|---|---|")
    for lv in levels:
        print(f"| {lv['clients']} | {lv['rps']:.1f} | {lv['rps'] / base['rps']:.2f} | {lv['p50_ms']:.1f} | "
              f"{lv['p99_ms']:.1f} | {lv['per_call']:.1f} |")
    print(f"server peak memory (VmHWM): {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"size": size, "recommend": api, "baseline": base, "levels": levels, "server_peak_mib": peak},
                                        indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
