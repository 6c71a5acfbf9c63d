"""Co-engagement graphs built sparsely, and Leiden communities on them (graph and user priors).

Only training-period interactions count: for each user the last `holdout` interactions (the
validation and test targets of the windows built later: `holdout` must be ≥ 2τ) are dropped, so a
prior never sees what the model is evaluated on. The graph of the rows of a binary matrix `M`
(items × users for the item graph, users × items for the user graph) has the co-counts
`S = M Mᵀ` as candidate edge weights; only its non-zero entries — pairs of rows that share a column —
are ever formed: it is computed as a sparse product in row spans of bounded size (threads: scipy
releases the GIL) and each row keeps its `neighbors` most similar rows by cosine
`S_ij / sqrt(S_ii S_jj)` (ties to the lower row id; union over both ends). Time follows the pairs
(Σ over columns of their length², bounded by the per-user `cap`), memory the span and the edges —
neither the square of the node count. `neighbors = 0` keeps every co-engagement edge.
`knn_edges_dense`, the first version (each row scored against every row), is the tested reference.
"""

from __future__ import annotations

import ctypes
import math
import os
import random
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import duckdb
import igraph as ig
import leidenalg
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import scipy.sparse as sp

from mhr.errors import InputError

# cells of the dense [rows × n] co-count block one chunk of the dense reference scores (per thread)
CHUNK_CELLS = 1 << 23
# co-count entries one span of the sparse kNN holds (per thread; ≈ 40 bytes an entry at the peak)
PAIR_BUDGET = 1 << 22

# version of `search_resolution`, in the key of priors built with --clusters (1: the reference search;
# 3: ×2 steps through a plateau instead of ×4; 4: on the non-isolated nodes only, whole-graph
# iterations by igraph's own Leiden)
RESOLUTION_SEARCH = 4
# resolution factor of a whole-graph pass while the community count stays flat: past a plateau counts
# jump (planted communities shatter), and a pass at a far higher resolution costs several plain ones
PLATEAU_STEP = 2.0


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


def _top_dense(counts: np.ndarray, cos: np.ndarray, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each row's `neighbors` largest `cos`, ties at the boundary to the lower column."""
    neg = -cos
    kth = np.partition(neg, neighbors - 1, axis=1)[:, neighbors - 1:neighbors]
    tie = neg == kth
    need = neighbors - (neg < kth).sum(axis=1, keepdims=True)
    r, c = np.nonzero((neg < kth) | (tie & (np.cumsum(tie, axis=1) <= need)))
    keep = counts[r, c] > 0
    return r[keep], c[keep]


def _chunk_edges_dense(
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
    r, c = _top_dense(counts, cos, neighbors)
    return r + start, c, counts[r, c]


def _undirected(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The union over both ends of each row's kept (row, col, count): (src < dst) sorted, deduplicated
    (the first occurrence's count; both ends of a pair have the same co-count).

    Consumes `parts` (emptied as they are read): each pair is packed into one int64 code as it is
    copied and its part is freed, so the peak is the codes and counts (12 bytes an edge) and the sort,
    not the parts, their int64 copies and both ends side by side (≈ 3× that at 20M × 500k)."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    total = sum(len(p[0]) for p in parts)
    code = np.empty(total, dtype=np.int64)
    w = np.empty(total, dtype=np.result_type(*[p[2].dtype for p in parts]))
    at = 0
    parts.reverse()
    while parts:
        src, dst, count = parts.pop()
        k = len(src)
        np.multiply(np.minimum(src, dst), n, out=code[at:at + k], dtype=np.int64)
        code[at:at + k] += np.maximum(src, dst)
        w[at:at + k] = count
        at += k
        del src, dst, count
    code, first = np.unique(code, return_index=True)
    w = w[first].astype(np.float64)
    del first
    return code // n, code % n, w


def knn_edges_dense(
    m: sp.csr_matrix, neighbors: int, chunk: int = 256, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first kNN, kept as the reference `knn_edges` is tested against: each chunk of rows is scored
    densely against every row (O(rows²) cells, whether or not two rows share a column)."""
    n = m.shape[0]
    mt = m.T.tocsr()
    deg = np.asarray(m.sum(axis=1), dtype=np.float64).ravel()
    # ≈ 28 bytes a cell at the peak (counts, cosine and its temporaries): fewer rows per chunk on
    # big graphs; each row's selection is independent of the chunk it is in
    chunk = max(1, min(chunk, CHUNK_CELLS // max(n, 1)))
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(lambda s: _chunk_edges_dense(m, mt, deg, s[0], s[1], neighbors), spans))
    return _undirected(parts, n)


def _select_long_rows(neg: np.ndarray, indptr: np.ndarray, rows: np.ndarray, neighbors: int,
                      keep: np.ndarray, budget: int) -> None:
    """Mark in `keep` each of `rows`' `neighbors` smallest `neg` (entries of a CSR whose rows are sorted
    by column, so ties go to the lower column as in `_top_dense`): the rows, shortest first, are padded
    into blocks of at most ~`budget` cells and selected with a partition — linear in the entries."""
    lens = np.diff(indptr)[rows]
    order = np.argsort(lens, kind="stable")
    rows, lens = rows[order], lens[order]
    i = 0
    while i < len(rows):
        j = i + max(1, int(np.searchsorted(np.arange(1, len(rows) - i + 1) * lens[i:], budget, side="right")))
        block, blens = rows[i:j], lens[i:j]
        at = np.repeat(np.arange(len(block)), blens)
        within = np.arange(int(blens.sum())) - np.repeat(np.cumsum(blens) - blens, blens)
        entry = indptr[block][at] + within
        pad = np.full((len(block), int(blens[-1])), np.inf)
        pad[at, within] = neg[entry]
        kth = np.partition(pad, neighbors - 1, axis=1)[:, neighbors - 1:neighbors]
        tie = pad == kth
        need = neighbors - (pad < kth).sum(axis=1, keepdims=True)
        take = (pad < kth) | (tie & (np.cumsum(tie, axis=1) <= need))
        keep[entry[take[at, within] & np.isfinite(neg[entry])]] = True
        i = j


def _chunk_edges(
    m: sp.csr_matrix, mt: sp.csr_matrix, deg: np.ndarray, start: int, stop: int, neighbors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows start..stop: the co-counts of the pairs that share a column only (a sparse product), each
    row's `neighbors` best by cosine (ties to the lower column, as `_top_dense`)."""
    s = m[start:stop] @ mt
    s.sort_indices()
    lens = np.diff(s.indptr)
    r = np.repeat(np.arange(start, stop, dtype=np.int64), lens)
    c = s.indices.astype(np.int64)
    counts = s.data
    real = (r != c) & (counts > 0)
    n = m.shape[0]
    if neighbors <= 0 or neighbors >= n - 1:
        return r[real], c[real], counts[real]
    neg = np.where(real, -counts / np.sqrt(np.maximum(deg[r], 1) * np.maximum(deg[c], 1)), np.inf)
    keep = real & np.repeat(lens <= neighbors, lens)
    _select_long_rows(neg, s.indptr, np.flatnonzero(lens > neighbors), neighbors, keep, PAIR_BUDGET)
    return r[keep], c[keep], counts[keep]


def _work_spans(m: sp.csr_matrix, mt: sp.csr_matrix, budget: int) -> list[tuple[int, int]]:
    """Row spans whose product holds at most ~`budget` entries: a row's entries are at most the sum of
    its columns' lengths (the pairs it takes part in) and at most the row count."""
    col_len = np.diff(mt.indptr).astype(np.int64)
    work = np.minimum(m @ col_len, m.shape[0]).astype(np.int64) + 1
    ends = np.cumsum(work)
    spans, start = [], 0
    while start < m.shape[0]:
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - work[start] + budget, side="right")))
        spans.append((start, min(stop, m.shape[0])))
        start = stop
    return spans


def knn_edges(
    m: sp.csr_matrix, neighbors: int, chunk: int = 256, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (i < j) among the rows of binary `m` with co-count weights: each row keeps its
    `neighbors` most similar rows by cosine (`neighbors = 0`: every co-engaged row), union over both ends.

    Only pairs of rows that share a column are ever formed (`M Mᵀ` as a sparse product, in row spans of
    at most `PAIR_BUDGET` entries per thread), so time follows the pairs — Σ over columns of (column
    length)² — and memory the span, never rows². The same edges as `knn_edges_dense` (tested).
    `m`: csr [n, k]. Returns (src, dst, count) sorted by (src, dst); deterministic. `chunk` is unused
    (kept for the dense reference's signature)."""
    n = m.shape[0]
    mt = m.T.tocsr()
    deg = np.asarray(m.sum(axis=1), dtype=np.float64).ravel()
    spans = _work_spans(m, mt, PAIR_BUDGET)
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(lambda s: _chunk_edges(m, mt, deg, s[0], s[1], neighbors), spans))
    edges = _undirected(parts, n)
    _release_freed_memory()
    return edges


def _release_freed_memory() -> None:
    """Hand back to the system what glibc's allocator keeps after the kNN: the spans and parts are
    allocated in the worker threads' arenas, which keep their freed pages (≈ 1 GiB at 20M × 500k)
    where Leiden — in the main thread — cannot reuse them. Nothing where the C library is not glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Communities:
    """Final groups: `membership[node]` in 0..n_clusters-1, or `n_clusters` = the "other" group."""

    membership: np.ndarray
    n_clusters: int
    has_other: bool
    info: dict[str, Any] = field(default_factory=dict)


def _leiden(graph: ig.Graph, weights: list[float] | None, resolution: float | None, seed: int) -> np.ndarray:
    """One seeded Leiden call (2 iterations): modularity, or RB-configuration at `resolution`."""
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


def group_modularity(graph: ig.Graph, weights: list[float] | np.ndarray | None, labels: np.ndarray,
                     n_big: int) -> float:
    """Modularity of the final groups (`labels` from `_relabel`; -1, the "other" group, counted as one)."""
    return float(graph.modularity(np.where(labels < 0, n_big, labels).tolist(), weights))


@dataclass
class Search:
    """What a resolution search found: raw Leiden membership, resolution, and the (resolution, count) tried."""

    raw: np.ndarray
    resolution: float
    tried: list[tuple[float, int]]
    full_passes: int = 0  # Leiden iterations over the whole graph (a plain call is 2)


def search_resolution_reference(graph: ig.Graph, weights: list[float] | None, active: np.ndarray,
                                clusters: int, min_size: int, seed: int, max_steps: int = 40) -> Search:
    """The first search, kept as the reference the fast one is tested against: bisect the resolution
    with a whole Leiden call per step (×4 until bracketed, then geometric midpoints)."""
    tried: list[tuple[float, int]] = []
    best: tuple[int, float, np.ndarray] | None = None
    lo, hi, res = None, None, 1.0
    for _ in range(max_steps):
        raw = _leiden(graph, weights, res, seed)
        got = _relabel(raw, active, min_size)[1]
        tried.append((res, got))
        if best is None or abs(got - clusters) < best[0]:
            best = (abs(got - clusters), res, raw)
        if got == clusters:
            break
        if got < clusters:
            lo = res
            res = res * 4 if hi is None else math.sqrt(res * hi)
        else:
            hi = res
            res = res / 4 if lo is None else math.sqrt(res * lo)
        if (lo is not None and hi is not None and hi / lo < 1.0001) or res > 1e6 or res < 1e-8:
            break
    assert best is not None
    return Search(best[2], best[1], tried, 2 * len(tried))


@contextmanager
def _igraph_rng(rng: random.Random) -> Iterator[None]:
    """igraph's C routines draw from `rng` inside the block (python-igraph's generator is process-wide;
    outside it is the `random` module again, python-igraph's default)."""
    ig.set_random_number_generator(rng)
    try:
        yield
    finally:
        ig.set_random_number_generator(random)


class _Leiden:
    """Seeded Leiden passes on one graph: whole-graph iterations by igraph's Leiden (the same
    quality as leidenalg's RB-configuration, ~10× faster on large sparse graphs), searches on an
    aggregate and the node-moving polish by leidenalg; one generator each, so a run is reproducible."""

    def __init__(self, graph: ig.Graph, weights: list[float] | np.ndarray | None, active: np.ndarray,
                 min_size: int, seed: int) -> None:
        # igraph reads a float64 array as it is; leidenalg wants a list (≈ 32 bytes an edge in Python
        # floats), made only where a leidenalg partition is (the aggregate search)
        self.graph, self.active, self.min_size = graph, active, min_size
        self.weights = None if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
        self.opt = leidenalg.Optimiser()
        self.opt.set_rng_seed(seed)
        self.rng = random.Random(seed)
        self.tried: list[tuple[float, int]] = []
        self.full_passes = 0

    def partition(self, res: float, initial: np.ndarray | None = None) -> leidenalg.RBConfigurationVertexPartition:
        return leidenalg.RBConfigurationVertexPartition(
            self.graph, weights=None if self.weights is None else self.weights.tolist(), resolution_parameter=res,
            initial_membership=None if initial is None else initial.tolist())

    def improve(self, res: float, initial: np.ndarray | None = None) -> np.ndarray:
        """One Leiden iteration over the whole graph (the expensive step) at `res`, from the singletons
        or from `initial`: igraph's Leiden with the modularity objective at resolution `res`, which
        optimises the same quality as leidenalg's RB-configuration partition (up to the factor 2m)."""
        with _igraph_rng(self.rng):
            found = self.graph.community_leiden(
                objective_function="modularity", weights=self.weights, resolution=res, n_iterations=1,
                initial_membership=None if initial is None else initial.tolist())
        self.full_passes += 1
        raw = np.asarray(found.membership, dtype=np.int64)
        self.tried.append((res, self.count(raw)))
        return raw

    def count(self, raw: np.ndarray) -> int:
        return _relabel(raw, self.active, self.min_size)[1]

    def modularity(self, raw: np.ndarray) -> float:
        labels, n_big, _ = _relabel(raw, self.active, self.min_size)
        return group_modularity(self.graph, self.weights, labels, n_big)

    def bisect(self, base: np.ndarray, lo: tuple[float, int] | None, hi: tuple[float, int],
               clusters: int) -> tuple[float, np.ndarray]:
        """Search the resolution between `lo` and `hi` ((resolution, count) pairs; lo None: below hi) with
        Leiden on the graph aggregated by `base` (its communities as nodes, quality preserved): cheap, and
        any result is a union of `base`'s communities. Steps interpolate log count against log resolution
        (counts grow roughly as a power of the resolution), kept inside the inner 80% of the bracket."""
        agg = self.partition(1.0, base).aggregate_partition()
        best: tuple[int, float, np.ndarray] | None = None
        for _ in range(40):
            if lo is None:
                res = hi[0] / 4
            else:
                span = math.log(hi[0] / lo[0])
                slope = math.log(max(hi[1], 1) / max(lo[1], 1)) / span if span > 0 else 0.0
                step = math.log(clusters / max(lo[1], 1)) / slope if slope > 0 else span / 2
                res = lo[0] * math.exp(min(max(step, 0.1 * span), 0.9 * span))
            part = agg.aggregate_partition()  # each aggregate node on its own, quality preserved
            part.resolution_parameter = res
            self.opt.optimise_partition(part, n_iterations=1)
            raw = np.asarray(part.membership, dtype=np.int64)[base]
            got = self.count(raw)
            self.tried.append((res, got))
            if best is None or abs(got - clusters) < best[0]:
                best = (abs(got - clusters), res, raw)
            if got < clusters:
                lo = (res, got)
            else:
                hi = (res, got)
            if got == clusters or (lo is not None and hi[0] / lo[0] < 1.0001) or res < 1e-8:
                break
        assert best is not None
        return best[1], best[2]


def _meet(memberships: list[np.ndarray]) -> np.ndarray:
    """The coarsest partition finer than all of `memberships` (nodes together iff together in each)."""
    _, inverse = np.unique(np.column_stack(memberships), axis=0, return_inverse=True)
    return inverse.ravel().astype(np.int64)


def search_resolution(graph: ig.Graph, weights: list[float] | np.ndarray | None, active: np.ndarray, clusters: int,
                      min_size: int, seed: int, max_fine: int = 6) -> Search:
    """The RB-configuration resolution giving `clusters` communities of ≥ `min_size` nodes, in about
    1–2 Leiden calls instead of one call per bisection step. `communities` hands it the graph of the
    non-isolated nodes only (an isolated node never joins a community of ≥ 2 nodes and adds nothing to
    the quality, but Leiden would still carry it through every pass and every aggregate).

    1. One Leiden iteration at resolution 1; if it has `clusters` communities, a second finishes the
       plain call (two iterations of igraph's Leiden at resolution 1).
    2. Too few: one iteration at a higher resolution (aiming at ~1.5× `clusters`, at most ×4: past
       some resolution communities fall below `min_size` and the count drops again; ×2 while the count
       stays flat), until enough.
    3. Search on the graph aggregated by the meet of these partitions (hundreds to a few thousand
       nodes: cheap), so each step's communities are unions of communities found on the whole graph
       at both ends of the bracket.
    No polish after the aggregate search (search 3 ran leidenalg's node-moving phase on the whole
    graph: 2–4 igraph iterations' time for +0.0003–0.002 modularity; one more igraph iteration from
    the result gains +0.0007 on average on the nested-block test graphs and can change the count).
    """
    lei = _Leiden(graph, weights, active, min_size, seed)
    raw = lei.improve(1.0)
    if lei.count(raw) == clusters:
        raw = lei.improve(1.0, raw)
        if lei.count(raw) == clusters:
            return Search(raw, 1.0, lei.tried, lei.full_passes)
    parts = [raw]
    lo: tuple[float, int] | None = None
    hi = (1.0, lei.count(raw))
    while hi[1] < clusters and len(parts) < max_fine:
        plateau = lo is not None and hi[1] == lo[1]  # e.g. planted communities that split only much later
        res = hi[0] * (PLATEAU_STEP if plateau else min(4.0, max(1.5, 1.5 * clusters / max(hi[1], 1))))
        raw = lei.improve(res)
        parts.append(raw)
        lo, hi = hi, (res, lei.count(raw))
        if hi[1] < lo[1]:
            break  # past the peak (communities fall below min_size): the search finds the closest
    if hi[1] == clusters:
        res, raw = hi[0], parts[-1]
    else:
        res, raw = lei.bisect(_meet(parts), lo, hi, clusters)
    return Search(raw, res, lei.tried, lei.full_passes)


def edge_graph(n_nodes: int, src: np.ndarray, dst: np.ndarray) -> ig.Graph:
    """The undirected igraph graph with edges (src[e], dst[e]) in that order.

    Handing igraph the pairs from Python (a list, or a numpy array it walks row by row) costs
    ≈ 200 bytes an edge in Python objects — 5 GB above the arrays at 25M edges
    (benchmarks/bench_graph_memory.py). Instead the pairs go through a temporary edge-list file,
    written by Arrow's CSV writer and read by igraph's C reader: only igraph's own ≈ 40 bytes an
    edge, and the same graph."""
    with tempfile.TemporaryDirectory(prefix="mhr-edges-") as tmp:
        path = os.path.join(tmp, "edges.txt")
        table = pa.table({"src": np.asarray(src, dtype=np.int64), "dst": np.asarray(dst, dtype=np.int64)})
        pacsv.write_csv(table, path, pacsv.WriteOptions(include_header=False, delimiter=" "))
        del table
        graph = ig.Graph.Read_Edgelist(path, directed=False)
    if graph.vcount() < n_nodes:  # the reader stops at the highest node with an edge
        graph.add_vertices(n_nodes - graph.vcount())
    return graph


def communities(
    n_nodes: int,
    src: np.ndarray,
    dst: np.ndarray,
    weight: np.ndarray | None,
    *,
    clusters: int | None,
    min_size: int,
    seed: int,
    reference: bool = False,
) -> Communities:
    """Leiden (modularity, seeded) on the graph; with `clusters`, search the RB-configuration
    resolution until `clusters` communities of ≥ `min_size` nodes remain (the closest count
    otherwise; `search_resolution`, or with `reference` the first search, one Leiden call per step).
    Nodes without edges and members of smaller communities form the "other" group.

    The search runs on the graph of the non-isolated nodes only (renumbered in order): isolated nodes
    go to "other" as before, and the modularity is the same (a node without edges adds nothing to it).
    The plain call (no `clusters`) and the reference search keep the whole graph, so their
    communities — and the keys of priors built without `--clusters` — are what they were."""
    if len(src) == 0:
        raise InputError(
            "the co-engagement graph has no edges (no two training interactions share a user or item)",
            hint="lower --holdout, or use a prior that needs no graph (--kind item / event / temporal)",
        )
    weights = None if weight is None else np.asarray(weight, dtype=np.float64)
    active = np.zeros(n_nodes, dtype=bool)
    active[src] = True
    active[dst] = True
    info: dict[str, Any] = {"nodes": n_nodes, "edges": len(src), "isolated": int((~active).sum())}
    if clusters is not None and not reference:
        nodes = np.flatnonzero(active)
        index = np.full(n_nodes, -1, dtype=np.int64)
        index[nodes] = np.arange(len(nodes))
        graph = edge_graph(len(nodes), index[src], index[dst])
        search = search_resolution(graph, weights, np.ones(len(nodes), dtype=bool), clusters, min_size, seed)
        found, n_big, small = _relabel(search.raw, np.ones(len(nodes), dtype=bool), min_size)
        modularity = group_modularity(graph, weights, found, n_big)
        labels = np.full(n_nodes, -1, dtype=np.int64)
        labels[nodes] = found
    else:
        graph = edge_graph(n_nodes, src, dst)
        if clusters is None:
            raw = _leiden(graph, None if weights is None else weights.tolist(), None, seed)
            labels, n_big, small = _relabel(raw, active, min_size)
            info.update(resolution=None, raw_clusters=int(len(np.unique(raw[active]))))
        else:
            search = search_resolution_reference(graph, None if weights is None else weights.tolist(), active,
                                                 clusters, min_size, seed)
            labels, n_big, small = _relabel(search.raw, active, min_size)
        modularity = group_modularity(graph, weights, labels, n_big)
    if clusters is not None:
        info.update(resolution=search.resolution, tried=[[round(r, 6), c] for r, c in search.tried],
                    requested=clusters, full_passes=search.full_passes)
        if n_big != clusters:
            info["unreachable"] = True
    other = labels < 0
    member = np.where(other, n_big, labels)
    info.update(clusters=n_big, small_clusters_merged=small, other_nodes=int(other.sum()))
    info["modularity"] = modularity
    return Communities(member, n_big, bool(other.any()), info)
