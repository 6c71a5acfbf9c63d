"""Graph and user priors at the size of the paper's news dataset .

    python benchmarks/bench_priors.py --dir /tmp/bench-priors            # 45k users, 25k items, 30M
    python benchmarks/bench_priors.py --dir /tmp/bp --interactions 3000000  # a quicker check

Makes the log with `mhr data synth` (planted communities; skipped when the store already has the
same data key), then runs `mhr priors build --kind graph --clusters 20` and `mhr priors build
--kind user --clusters 8` as child processes, each timed and measured (peak RSS of that child,
from /usr/bin/time -v). Goal: ≤ 10 min and ≤ 12 GB each on a 2-core machine. With planted
truth, it also reports the NMI of the recovered communities against `items.attrs.community`.

    python benchmarks/bench_priors.py --ratio-store WS/toys/store.duckdb --holdout 2 --reference

times, in one process, one Leiden call against the whole `--clusters` resolution search (the new
one, and with --reference the first one) on the graph prior's graph of an existing store. "One call"
is leidenalg's (2 iterations at resolution 1, the whole graph: what the reference search steps with);
the ratio against igraph's Leiden call on the non-isolated nodes (what search 4 steps with) is printed
beside it.

    python benchmarks/bench_priors.py --knn-store /tmp/bench-priors/ws/news/store.duckdb

times, in one process, the sparse kNN (`knn_edges`) against the dense reference (`knn_edges_dense`) on
the graph prior's item graph, and checks they give the same edges.

    python benchmarks/bench_priors.py --scaling /tmp/bench-scaling --base 25000,25000,500000 [--dense]

the two scaling ratios of the graph prior: 4× the items over the same interactions, and a 10× larger
log at the same density (10× users, items and interactions), each as `mhr priors build --kind graph
--clusters 20` children (wall, peak RSS) and as the kNN alone in this process (with --dense, the
dense reference too, for the base and 4× logs).
"""

from __future__ import annotations

import argparse
import json
import random
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


def search_ratio(store: Path, kind: str, clusters: list[int], holdout: int, reference: bool) -> list[dict]:
    """In this process, on the prior's own graph: one Leiden call (resolution 1) against the whole
    resolution search for each requested count (CPU and wall seconds), with the reference search too."""
    import igraph as ig

    from mhr.priors.coengagement import (
        _leiden,
        binary_matrix,
        communities,
        knn_edges,
        search_resolution,
        training_pairs,
    )
    from mhr.priors.user import sample_per_item

    con = duckdb.connect(str(store), read_only=True)
    n_items = con.execute("SELECT max(item_id) FROM items").fetchone()[0]
    n_users = con.execute("SELECT max(user_id) FROM users").fetchone()[0]
    users, items = training_pairs(con, holdout, 1000 if kind == "graph" else None)
    con.close()
    if kind == "user":  # as the user prior samples (defaults: 2000 users per item, seed 0)
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        keep = sample_per_item(users, items, 2000, 0)
        users, items = users[keep], items[keep]
    m = (binary_matrix(items, users, (n_items + 1, n_users + 1)) if kind == "graph"
         else binary_matrix(users, items, (n_users + 1, n_items + 1)))
    cache = store.parent / f"knn-{kind}-h{holdout}.npz"  # the edges, kept beside the store for reruns
    if cache.is_file():
        z = np.load(cache)
        src, dst, w = z["src"], z["dst"], z["w"]
    else:
        src, dst, w = knn_edges(m, 50)
        np.savez(cache, src=src, dst=dst, w=w)
    graph = ig.Graph(n=m.shape[0], edges=np.column_stack([src, dst]).tolist(), directed=False)

    def timed(fn, *args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        return out, time.process_time() - cpu, time.perf_counter() - wall

    _, one_cpu, one_wall = timed(_leiden, graph, w.tolist(), 1.0, 0)
    print(f"{kind} graph: {m.shape[0]:,} nodes, {len(src):,} edges; one Leiden call {one_cpu:.2f} s CPU "
          f"({one_wall:.2f} s wall)", flush=True)
    # what search 4 iterates with: igraph's Leiden (2 iterations at resolution 1, seeded) on the
    # non-isolated nodes — "one call" of its own kind, beside leidenalg's call above
    nodes = np.unique(np.concatenate([src, dst]))
    sub = ig.Graph(n=len(nodes), edges=np.column_stack([np.searchsorted(nodes, src),
                                                        np.searchsorted(nodes, dst)]).tolist(), directed=False)
    ig.set_random_number_generator(random.Random(0))
    try:
        _, ig_cpu, ig_wall = timed(sub.community_leiden, objective_function="modularity", weights=w.tolist(),
                                   resolution=1.0, n_iterations=2)
    finally:
        ig.set_random_number_generator(random)
    print(f"  igraph's Leiden on the {len(nodes):,} non-isolated nodes: {ig_cpu:.2f} s CPU ({ig_wall:.2f} s wall)",
          flush=True)
    rows = []
    for k in clusters:
        for ref in (False, True) if reference else (False,):
            found, cpu, wall = timed(communities, m.shape[0], src, dst, w, clusters=k, min_size=5, seed=0,
                                     reference=ref)
            row = {"search": "reference" if ref else "new", "clusters": k, "got": found.n_clusters,
                   "modularity": round(found.info["modularity"], 4), "cpu_s": round(cpu, 2),
                   "wall_s": round(wall, 2), "ratio_cpu": round(cpu / one_cpu, 2),
                   "ratio_wall": round(wall / one_wall, 2), "ratio_cpu_igraph_call": round(cpu / ig_cpu, 2),
                   "steps": len(found.info["tried"]),
                   "full_passes": found.info["full_passes"]}
            if not ref:  # the search alone, without building the graph (what igraph's call is timed on)
                _, alone, _ = timed(search_resolution, sub, w, np.ones(len(nodes), dtype=bool), k, 5, 0)
                row.update(search_alone_cpu_s=round(alone, 2), ratio_alone_igraph_call=round(alone / ig_cpu, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _item_matrix(store: Path, holdout: int = 16, cap: int | None = 1000):
    from mhr.priors.coengagement import binary_matrix, training_pairs

    con = duckdb.connect(str(store), read_only=True)
    n_items = con.execute("SELECT max(item_id) FROM items").fetchone()[0]
    n_users = con.execute("SELECT max(user_id) FROM users").fetchone()[0]
    users, items = training_pairs(con, holdout, cap)
    con.close()
    return binary_matrix(items, users, (n_items + 1, n_users + 1))


def _timed_knn(fn, m) -> tuple[tuple, float]:
    t = time.perf_counter()
    out = fn(m, 50)
    return out, time.perf_counter() - t


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def knn_compare(store: Path, dense: bool = True) -> dict:
    """The sparse kNN against the dense reference on a store's item graph, in this process."""
    from mhr.priors.coengagement import knn_edges, knn_edges_dense

    m = _item_matrix(store)
    pairs = int((np.diff(m.T.tocsr().indptr).astype(np.int64) ** 2).sum())
    (src, dst, w), sparse_s = _timed_knn(knn_edges, m)
    row = {"items": m.shape[0] - 1, "training_pairs": int(m.nnz), "pair_instances": pairs,
           "edges": len(src), "sparse_s": round(sparse_s, 2), "peak_rss_gib_after_sparse": round(_peak_gib(), 2)}
    if dense:
        (s2, d2, w2), dense_s = _timed_knn(knn_edges_dense, m)
        row.update(dense_s=round(dense_s, 2), dense_over_sparse=round(dense_s / sparse_s, 2),
                   same_edges=bool(np.array_equal(src, s2) and np.array_equal(dst, d2) and np.array_equal(w, w2)))
    print(json.dumps(row), flush=True)
    return row


def scaling(root: Path, base: tuple[int, int, int], dense: bool) -> None:
    """The graph prior on a base log, 4× the items over the same interactions, and 10× everything."""
    u, i, n = base
    logs = {"base": (u, i, n), "items4": (u, 4 * i, n), "log10": (10 * u, 10 * i, 10 * n)}
    rows = {}
    for name, (users, items, inter) in logs.items():
        ws = root / name / "ws"
        child(["--workspace", str(ws), "data", "synth", "--name", "s", "--users", str(users), "--items",
               str(items), "--interactions", str(inter), "--communities", "20"])
        s, rss, _ = child(["--workspace", str(ws), "--dataset", "s", "priors", "build", "--kind", "graph",
                           "--clusters", "20", "--force"])
        knn = knn_compare(ws / "s" / "store.duckdb", dense=dense and name != "log10")
        rows[name] = {"build_s": round(s, 1), "build_peak_rss_gib": round(rss, 2), **knn}
        print(name, json.dumps(rows[name]), flush=True)
    for what in ("build_s", "sparse_s", "dense_s"):
        if all(what in r for r in rows.values()) or (what == "dense_s" and "dense_s" in rows["items4"]):
            ratio4 = rows["items4"][what] / rows["base"][what]
            line = f"{what}: 4x items / base = {ratio4:.2f} (goal <= 3)"
            if what in rows["log10"]:
                line += f"; 10x log / base = {rows['log10'][what] / rows['base'][what]:.2f} (goal <= 15)"
            print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio-store", type=Path, default=None,
                    help="Only time the resolution search against one Leiden call on this store's graph.")
    ap.add_argument("--kind", choices=("graph", "user"), default="graph")
    ap.add_argument("--clusters", default="20,40,100", help="With --ratio-store: requested counts.")
    ap.add_argument("--holdout", type=int, default=16, help="With --ratio-store: the prior's --holdout.")
    ap.add_argument("--reference", action="store_true", help="With --ratio-store: also the first search.")
    ap.add_argument("--knn-store", type=Path, default=None,
                    help="Only time the sparse kNN against the dense reference on this store's item graph.")
    ap.add_argument("--scaling", type=Path, default=None, help="Only the two scaling ratios, logs under this dir.")
    ap.add_argument("--base", default="25000,25000,500000", help="With --scaling: users,items,interactions.")
    ap.add_argument("--dense", action="store_true", help="With --scaling: also the dense reference kNN.")
    ap.add_argument("--dir")
    ap.add_argument("--users", type=int, default=45_000)
    ap.add_argument("--items", type=int, default=25_000)
    ap.add_argument("--interactions", type=int, default=30_000_000)
    ap.add_argument("--communities", type=int, default=20)
    ap.add_argument("--only", choices=("graph", "user"), default=None)
    a = ap.parse_args()
    if a.knn_store:
        knn_compare(a.knn_store)
        return
    if a.scaling:
        scaling(a.scaling, tuple(int(x) for x in a.base.split(",")), a.dense)
        return
    if a.ratio_store:
        search_ratio(a.ratio_store, a.kind, [int(k) for k in a.clusters.split(",")], a.holdout, a.reference)
        return
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
