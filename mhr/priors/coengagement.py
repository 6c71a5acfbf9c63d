"""Co-engagement graphs built sparsely, and Leiden communities on them (graph and user priors).

Only training-period interactions count: for each user the last `holdout` interactions (the
validation and test targets of the windows built later: `holdout` must be ≥ 2τ) are dropped, so a
prior never sees what the model is evaluated on. The graph of the rows of a binary matrix `M`
(items × users for the item graph, users × items for the user graph) has the co-counts
`S = M Mᵀ` as candidate edge weights; it is computed in row chunks with scipy's sparse product
(threads: scipy releases the GIL) and each row keeps its `neighbors` most similar rows by cosine
`S_ij / sqrt(S_ii S_jj)` (union over both ends), so memory stays bounded by the edge count, not
the square of the node count. `neighbors = 0` keeps every co-engagement edge.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import duckdb
import igraph as ig
import leidenalg
import numpy as np
import scipy.sparse as sp

from mhr.errors import InputError


def training_pairs(
    con: duckdb.DuckDBPyConnection, holdout: int, cap: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user_id, item_id) of training interactions: each user's last `holdout` dropped,
    then at most the last `cap` of what is left."""
    upper = "pos <= last - $holdout"
    lower = "" if cap is None else " AND pos > last - $holdout - $cap"
    rows = con.execute(
        f"""
        WITH t AS (SELECT user_id, item_id, pos, max(pos) OVER (PARTITION BY user_id) AS last
                   FROM interactions)
        SELECT DISTINCT user_id, item_id FROM t WHERE {upper}{lower}
        """,
        {"holdout": holdout, **({} if cap is None else {"cap": cap})},
    ).fetchnumpy()
    return rows["user_id"].astype(np.int64), rows["item_id"].astype(np.int64)


def binary_matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _chunk_edges(
    m: sp.csr_matrix, mt: sp.csr_matrix, deg: np.ndarray, start: int, stop: int, neighbors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = (m[start:stop] @ mt).toarray()
    rows = np.arange(stop - start)
    counts[rows, rows + start] = 0.0
    n = counts.shape[1]
    if neighbors <= 0 or neighbors >= n - 1:
        r, c = np.nonzero(counts)
        return r + start, c, counts[r, c]
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = counts / np.sqrt(np.maximum(deg[start:stop, None], 1) * np.maximum(deg[None, :], 1))
    top = np.argpartition(-cos, neighbors - 1, axis=1)[:, :neighbors]
    r = np.repeat(rows, neighbors)
    c = top.ravel()
    w = counts[r, c]
    keep = w > 0
    return r[keep] + start, c[keep], w[keep]


def knn_edges(
    m: sp.csr_matrix, neighbors: int, chunk: int = 256, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (i < j) among the rows of binary `m` with co-count weights.

    `m`: csr [n, k]. Returns (src, dst, count) sorted by (src, dst); deterministic.
    """
    n = m.shape[0]
    mt = m.T.tocsr()
    deg = np.asarray(m.sum(axis=1), dtype=np.float64).ravel()
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(lambda s: _chunk_edges(m, mt, deg, s[0], s[1], neighbors), spans))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    src = np.concatenate([p[0] for p in parts]).astype(np.int64)
    dst = np.concatenate([p[1] for p in parts]).astype(np.int64)
    w = np.concatenate([p[2] for p in parts]).astype(np.float64)
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    code = lo * n + hi
    code, first = np.unique(code, return_index=True)
    return code // n, code % n, w[first]


@dataclass
class Communities:
    """Final groups: `membership[node]` in 0..n_clusters-1, or `n_clusters` = the "other" group."""

    membership: np.ndarray
    n_clusters: int
    has_other: bool
    info: dict[str, Any] = field(default_factory=dict)


def _leiden(graph: ig.Graph, weights: list[float] | None, resolution: float | None, seed: int) -> np.ndarray:
    if resolution is None:
        part = leidenalg.find_partition(
            graph, leidenalg.ModularityVertexPartition, weights=weights, seed=seed, n_iterations=2
        )
    else:
        part = leidenalg.find_partition(
            graph,
            leidenalg.RBConfigurationVertexPartition,
            weights=weights,
            resolution_parameter=resolution,
            seed=seed,
            n_iterations=2,
        )
    return np.asarray(part.membership, dtype=np.int64)


def _relabel(raw: np.ndarray, active: np.ndarray, min_size: int) -> tuple[np.ndarray, int, int]:
    """Clusters of active nodes sorted by size (desc); those below `min_size` -> -1 (other)."""
    sizes = np.bincount(raw[active], minlength=raw.max() + 1 if len(raw) else 0)
    big = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] >= max(min_size, 1)]
    new = np.full(sizes.shape[0], -1, dtype=np.int64)
    new[big] = np.arange(len(big))
    out = np.where(active, new[raw], -1)
    small = int(((sizes > 0) & (sizes < max(min_size, 1))).sum())
    return out, len(big), small


def communities(
    n_nodes: int,
    src: np.ndarray,
    dst: np.ndarray,
    weight: np.ndarray | None,
    *,
    clusters: int | None,
    min_size: int,
    seed: int,
    max_steps: int = 40,
) -> Communities:
    """Leiden (modularity, seeded) on the graph; with `clusters`, bisect the RB-configuration
    resolution until `clusters` communities of ≥ `min_size` nodes remain (the closest count
    otherwise). Nodes without edges and members of smaller communities form the "other" group."""
    if len(src) == 0:
        raise InputError(
            "the co-engagement graph has no edges (no two training interactions share a user or item)",
            hint="lower --holdout, or use a prior that needs no graph (--kind item / event / temporal)",
        )
    graph = ig.Graph(n=n_nodes, edges=np.column_stack([src, dst]).tolist(), directed=False)
    weights = None if weight is None else weight.tolist()
    active = np.zeros(n_nodes, dtype=bool)
    active[src] = True
    active[dst] = True
    info: dict[str, Any] = {"nodes": n_nodes, "edges": len(src), "isolated": int((~active).sum())}
    if clusters is None:
        raw = _leiden(graph, weights, None, seed)
        labels, n_big, small = _relabel(raw, active, min_size)
        info.update(resolution=None, raw_clusters=int(len(np.unique(raw[active]))))
    else:
        tried: list[tuple[float, int]] = []
        best: tuple[int, float, np.ndarray, int, int] | None = None

        def attempt(res: float) -> int:
            nonlocal best
            raw = _leiden(graph, weights, res, seed)
            labels, n_big, small = _relabel(raw, active, min_size)
            tried.append((res, n_big))
            gap = abs(n_big - clusters)
            if best is None or gap < abs(best[3] - clusters):
                best = (gap, res, labels, n_big, small)
            return n_big

        lo, hi = None, None
        res = 1.0
        for _ in range(max_steps):
            got = attempt(res)
            if got == clusters:
                break
            if got < clusters:
                lo = res
                res = res * 4 if hi is None else math.sqrt(res * hi)
            else:
                hi = res
                res = res / 4 if lo is None else math.sqrt(res * lo)
            if lo is not None and hi is not None and hi / lo < 1.0001:
                break
            if res > 1e6 or res < 1e-8:
                break
        assert best is not None
        _, res, labels, n_big, small = best
        info.update(resolution=res, tried=[[round(r, 6), c] for r, c in tried], requested=clusters)
        if n_big != clusters:
            info["unreachable"] = True
    other = labels < 0
    member = np.where(other, n_big, labels)
    info.update(clusters=n_big, small_clusters_merged=small, other_nodes=int(other.sum()))
    part_weights = weights
    mod_labels = np.where(active, member, -1)
    # modularity of the final groups over the nodes that have edges ("other" counted as one group)
    info["modularity"] = float(graph.modularity(np.where(mod_labels < 0, n_big, mod_labels).tolist(), part_weights))
    return Communities(member, n_big, bool(other.any()), info)
