"""The co-engagement graph's bounded-memory paths give exactly what the plain ones give: the kNN
edges for any row-chunk size (the chunk adapts to the node count), and the igraph graph built
through an edge-list file equals the one built from the whole edge list in Python."""

import igraph as ig
import numpy as np
import pytest

from mhr.priors import coengagement
from mhr.priors.coengagement import binary_matrix, communities, edge_graph, knn_edges


def _matrix(seed: int, rows: int = 300, cols: int = 120, nnz: int = 2500):
    rng = np.random.default_rng(seed)
    # skewed popularity, so rows have many tied co-counts at the top-k boundary
    r = rng.integers(0, rows, nnz)
    c = np.minimum(rng.zipf(1.6, nnz) - 1, cols - 1)
    return binary_matrix(r, c, (rows, cols))


@pytest.mark.parametrize("neighbors", [0, 5, 40])
def test_knn_edges_do_not_depend_on_the_chunk(monkeypatch, neighbors):
    m = _matrix(0)
    src, dst, w = knn_edges(m, neighbors, chunk=256)
    assert len(src) > 0
    for cells in (1, 300 * 7, 300 * 64):  # one row per chunk, 7 rows, 64 rows
        monkeypatch.setattr(coengagement, "CHUNK_CELLS", cells)
        s2, d2, w2 = knn_edges(m, neighbors, chunk=256)
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
