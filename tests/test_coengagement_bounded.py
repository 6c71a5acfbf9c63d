"""The co-engagement graph's bounded-memory paths give exactly what the plain ones give: the sparse
kNN (pairs that share a column only) the dense reference's edges, both for any row-chunk or span
size, and the igraph graph built through an edge-list file equals the one built from the whole edge
list in Python."""

import igraph as ig
import numpy as np
import pytest

from mhr.priors import coengagement
from mhr.priors.coengagement import binary_matrix, communities, edge_graph, knn_edges, knn_edges_dense


def _matrix(seed: int, rows: int = 300, cols: int = 120, nnz: int = 2500):
    rng = np.random.default_rng(seed)
    # skewed popularity, so rows have many tied co-counts at the top-k boundary
    r = rng.integers(0, rows, nnz)
    c = np.minimum(rng.zipf(1.6, nnz) - 1, cols - 1)
    return binary_matrix(r, c, (rows, cols))


@pytest.mark.parametrize("neighbors", [0, 1, 5, 40, 299, 400])
@pytest.mark.parametrize("seed", [0, 2])
def test_sparse_knn_gives_the_dense_reference_edges(neighbors, seed):
    m = _matrix(seed)
    dense = knn_edges_dense(m, neighbors)
    sparse = knn_edges(m, neighbors)
    assert len(dense[0]) > 0
    for a, b in zip(sparse, dense, strict=True):
        np.testing.assert_array_equal(a, b)


def test_boundary_ties_go_to_the_lower_row():
    # row 0 = columns 0..3, tied with rows 1..4 (one shared column each, cosine 1/sqrt(12)): it keeps
    # the two lowest. Row i = columns i-1, 10+i, 20+i prefers rows 4+i and 8+i (1/sqrt(3)), so the
    # union over both ends does not bring rows 3 and 4 back.
    r, c = [0, 0, 0, 0], [0, 1, 2, 3]
    for i in range(1, 5):
        r += [i, i, i, 4 + i, 8 + i]
        c += [i - 1, 10 + i, 20 + i, 10 + i, 20 + i]
    m = binary_matrix(np.array(r), np.array(c), (13, 25))
    want = [(0, 1), (0, 2)] + [e for i in range(1, 5) for e in ((i, 4 + i), (i, 8 + i))]
    for knn in (knn_edges, knn_edges_dense):
        src, dst, _ = knn(m, 2)
        assert list(zip(src.tolist(), dst.tolist(), strict=True)) == sorted(want)


@pytest.mark.parametrize("neighbors", [0, 5, 40])
def test_knn_edges_do_not_depend_on_the_chunk(monkeypatch, neighbors):
    m = _matrix(0)
    src, dst, w = knn_edges_dense(m, neighbors, chunk=256)
    assert len(src) > 0
    for cells, pairs in ((1, 1), (300 * 7, 50), (300 * 64, 5000)):  # one row per chunk or span, more
        monkeypatch.setattr(coengagement, "CHUNK_CELLS", cells)
        monkeypatch.setattr(coengagement, "PAIR_BUDGET", pairs)
        for s2, d2, w2 in (knn_edges_dense(m, neighbors, chunk=256), knn_edges(m, neighbors)):
            np.testing.assert_array_equal(s2, src)
            np.testing.assert_array_equal(d2, dst)
            np.testing.assert_array_equal(w2, w)


def test_edge_graph_equals_the_graph_from_the_edge_list():
    src, dst, w = knn_edges(_matrix(1), 10)
    n = 310  # ten trailing nodes without an edge: the file reader alone would not create them
    whole = ig.Graph(n=n, edges=np.column_stack([src, dst]).tolist(), directed=False)
    built = edge_graph(n, src, dst)
    assert built.vcount() == whole.vcount() == n and built.ecount() == whole.ecount() == len(src)
    assert not built.is_directed()
    assert built.get_edgelist() == whole.get_edgelist()  # same edges in the same order (weights align)
    a = communities(n, src, dst, w, clusters=4, min_size=3, seed=0)
    assert a.info["nodes"] == n and a.membership.shape == (n,)
    assert a.info["isolated"] == 10 + int(n - 10 - len(np.union1d(src, dst)))


def test_edge_graph_without_edges_keeps_its_nodes():
    g = edge_graph(5, np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert g.vcount() == 5 and g.ecount() == 0
