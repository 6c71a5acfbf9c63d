"""Peak memory of the co-engagement graph's two big steps, the plain way against the bounded way,
each in a fresh child process (peak RSS from the child's own rusage, and the part above its RSS
once its inputs exist).

    python benchmarks/bench_graph_memory.py            # 25M edges over 500k nodes (the full pipeline size)
    python benchmarks/bench_graph_memory.py --quick    # 2M edges over 50k nodes

1. igraph hand-over: `ig.Graph(edges=<all pairs as one Python list>)` (before) against
   `coengagement.edge_graph` (an edge-list file read by igraph's C reader);
2. one kNN chunk: the dense co-count block of 256 rows (the fixed chunk before) against the rows
   `CHUNK_CELLS` allows at this node count, scored against every node (what each of the kNN
   threads holds at once).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(task: str, n: int, e: int, rows: int, out) -> None:
    import numpy as np
    import scipy.sparse as sp

    from mhr.priors import coengagement

    rng = np.random.default_rng(0)
    if task.startswith("graph"):
        src = rng.integers(0, n, e)
        dst = rng.integers(0, n, e)
        base = _rss_mib()
        t = time.perf_counter()
        if task == "graph-list":
            import igraph as ig
            g = ig.Graph(n=n, edges=np.column_stack([src, dst]).tolist(), directed=False)
        else:
            g = coengagement.edge_graph(n, src, dst)
        assert g.ecount() == e
    else:  # one kNN chunk of `rows` rows against n nodes, 40 columns (users) a row on average
        users = max(n // 2, 1)
        m = coengagement.binary_matrix(rng.integers(0, n, 40 * n), rng.integers(0, users, 40 * n), (n, users))
        mt = m.T.tocsr()
        deg = np.asarray(m.sum(axis=1), dtype=np.float64).ravel()
        base = _rss_mib()
        t = time.perf_counter()
        coengagement._chunk_edges(m, mt, deg, 0, rows, 50)
        assert isinstance(m, sp.csr_matrix)
    out.send((time.perf_counter() - t, _peak_mib(), base))


def run(task: str, n: int, e: int, rows: int = 0) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child, args=(task, n, e, rows, b))
    p.start()
    result = a.recv()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    from mhr.priors.coengagement import CHUNK_CELLS

    n, e = (50_000, 2_000_000) if a.quick else (500_000, 25_000_000)
    rows = max(1, min(256, CHUNK_CELLS // n))
    print(f"{n:,} nodes, {e:,} edges; kNN chunk rows: 256 before, {rows} now")
    print("| step | way | s | peak RSS MiB | above inputs MiB |\n|---|---|---|---|---|")
    res = {}
    for step, way, task, r in [("igraph hand-over", "one list (before)", "graph-list", 0),
                               ("igraph hand-over", "edge_graph (edge-list file)", "graph-file", 0),
                               ("one kNN chunk", "256 rows (before)", "knn", 256),
                               ("one kNN chunk", f"{rows} rows", "knn", rows)]:
        s, peak, base = run(task, n, e, r)
        res[(step, way)] = peak - base
        print(f"| {step} | {way} | {s:.1f} | {peak:,.0f} | {peak - base:,.0f} |", flush=True)
    keys = list(res)
    print(f"ratios (above inputs, before / now): hand-over {res[keys[0]] / res[keys[1]]:.1f}×, "
          f"kNN chunk {res[keys[2]] / res[keys[3]]:.1f}×")


if __name__ == "__main__":
    main()
