"""The fast Leiden resolution search against the first one, kept as the reference: the same
requested clusters are reached with the same or better modularity, in far fewer whole-graph passes."""

from __future__ import annotations

import random

import igraph as ig
import numpy as np
import pytest

from mhr.priors.coengagement import (
    _meet,
    _relabel,
    communities,
    group_modularity,
    search_resolution,
    search_resolution_reference,
)


def nested_blocks(seed: int = 0, n_super: int = 6, n_sub: int = 4) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Items in `n_super` groups of `n_sub` blocks of uneven size: dense within a block, sparser within
    its group, rare across; co-count-like integer weights. Returns (n, src, dst, weight), src < dst."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(15, 60, n_super * n_sub)
    block = np.repeat(np.arange(len(sizes)), sizes)
    group = block // n_sub
    n = len(block)
    i, j = np.triu_indices(n, k=1)
    p = np.where(block[i] == block[j], 0.25, np.where(group[i] == group[j], 0.04, 0.004))
    keep = rng.random(len(i)) < p
    src, dst = i[keep], j[keep]
    weight = rng.integers(1, 5, len(src)).astype(np.float64)
    return n, src.astype(np.int64), dst.astype(np.int64), weight


@pytest.fixture(scope="module")
def graph():
    n, src, dst, w = nested_blocks()
    g = ig.Graph(n=n, edges=np.column_stack([src, dst]).tolist(), directed=False)
    active = np.zeros(n, dtype=bool)
    active[src] = True
    active[dst] = True
    return g, w.tolist(), active, (n, src, dst, w)


def _modularity(g, weights, raw, active, min_size=5) -> tuple[int, float]:
    labels, n_big, _ = _relabel(raw, active, min_size)
    return n_big, group_modularity(g, weights, labels, n_big)


@pytest.mark.parametrize("clusters", [3, 6, 10, 16, 24])
def test_fast_search_matches_the_reference(graph, clusters):
    g, weights, active, _ = graph
    ref = search_resolution_reference(g, weights, active, clusters, min_size=5, seed=0)
    new = search_resolution(g, weights, active, clusters, min_size=5, seed=0)
    ref_count, ref_mod = _modularity(g, weights, ref.raw, active)
    new_count, new_mod = _modularity(g, weights, new.raw, active)
    assert abs(new_count - clusters) <= abs(ref_count - clusters)
    assert new_count == clusters
    assert new_mod >= ref_mod - 0.01, (new_mod, ref_mod)
    # whole-graph Leiden iterations: a plain call is 2; the reference spends 2 per step
    assert new.full_passes <= 4 and new.full_passes <= ref.full_passes


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same grouping of the nodes, whatever the labels."""
    return len(np.unique(_meet([a, b]))) == len(np.unique(a)) == len(np.unique(b))


def test_hit_at_resolution_one_is_the_plain_leiden_call(graph):
    """Search 4 runs igraph's Leiden on the whole graph: at the natural count it is two seeded
    iterations at resolution 1 — here the same communities as the reference search's first (leidenalg)
    call, labelled differently."""
    g, weights, active, _ = graph
    natural = search_resolution_reference(g, weights, active, 1000, 5, 0).tried[0][1]
    ref = search_resolution_reference(g, weights, active, natural, min_size=5, seed=0)
    new = search_resolution(g, weights, active, natural, min_size=5, seed=0)
    ig.set_random_number_generator(random.Random(0))
    try:
        plain = g.community_leiden(objective_function="modularity", weights=weights, resolution=1.0,
                                   n_iterations=2).membership
    finally:
        ig.set_random_number_generator(random)
    assert ref.resolution == new.resolution == 1.0 and new.full_passes == 2
    assert np.array_equal(new.raw, plain)
    assert _same_partition(new.raw, ref.raw)


def test_same_seed_same_partition(graph):
    _, _, _, (n, src, dst, w) = graph
    runs = [communities(n, src, dst, w, clusters=10, min_size=5, seed=s) for s in (3, 3, 4)]
    assert np.array_equal(runs[0].membership, runs[1].membership)
    assert runs[0].info == runs[1].info
    assert runs[0].n_clusters == runs[2].n_clusters == 10


def test_unreachable_count_gives_the_closest(graph):
    _, _, _, (n, src, dst, w) = graph
    found = communities(n, src, dst, w, clusters=500, min_size=5, seed=0)
    assert found.info.get("unreachable") and found.n_clusters < 500
    assert found.info["full_passes"] <= 7


def test_count_near_the_largest_reachable(graph):
    """Past some resolution communities fall below min_size and the count drops again: the search
    must not step over the peak."""
    g, weights, active, _ = graph
    new = search_resolution(g, weights, active, 90, min_size=5, seed=0)
    assert _relabel(new.raw, active, 5)[1] == 90


def test_count_beyond_a_plateau_of_planted_communities():
    """Six dense, almost separate blocks: the count stays 6 over a wide range of resolutions before the
    blocks split; the search must step on through the plateau (the reference reaches 12 too)."""
    rng = np.random.default_rng(1)
    block = np.repeat(np.arange(6), 120)
    i, j = np.triu_indices(len(block), 1)
    keep = rng.random(len(i)) < np.where(block[i] == block[j], 0.3, 0.0005)
    g = ig.Graph(n=len(block), edges=np.column_stack([i[keep], j[keep]]).tolist(), directed=False)
    active = np.ones(len(block), dtype=bool)
    new = search_resolution(g, None, active, 12, min_size=5, seed=0)
    assert new.tried[1][1] == 6 and _relabel(new.raw, active, 5)[1] == 12


def _with_isolated(n: int, src: np.ndarray, dst: np.ndarray, factor: int = 3, seed: int = 0):
    """The same graph with its nodes spread among (factor - 1)·n isolated ones (order kept): the
    positions of the original nodes, and the new src / dst."""
    slots = np.sort(np.random.default_rng(seed).choice(factor * n, n, replace=False))
    return factor * n, slots, slots[src], slots[dst]


@pytest.mark.parametrize("clusters", [6, 16])
def test_search_ignores_isolated_nodes(graph, clusters):
    """The search runs on the non-isolated nodes only: isolated nodes interleaved anywhere change
    nothing — the same communities, resolution, tries and modularity as the graph without them (same
    seed) — and all go to "other"."""
    _, _, _, (n, src, dst, w) = graph
    plain = communities(n, src, dst, w, clusters=clusters, min_size=5, seed=0)
    big, slots, bsrc, bdst = _with_isolated(n, src, dst)
    spread = communities(big, bsrc, bdst, w, clusters=clusters, min_size=5, seed=0)
    assert np.array_equal(spread.membership[slots], plain.membership)
    isolated = np.ones(big, dtype=bool)
    isolated[slots] = False
    assert (spread.membership[isolated] == spread.n_clusters).all() and spread.has_other
    assert spread.info["isolated"] == big - n and spread.info["other_nodes"] == plain.info["other_nodes"] + big - n
    for key in ("tried", "resolution", "clusters", "modularity", "full_passes"):
        assert spread.info[key] == plain.info[key], key
    # the modularity reported (on the non-isolated nodes) is the whole graph's, isolated nodes in "other"
    g = ig.Graph(n=big, edges=np.column_stack([bsrc, bdst]).tolist(), directed=False)
    assert spread.info["modularity"] == pytest.approx(g.modularity(spread.membership.tolist(), w.tolist()))


@pytest.mark.parametrize("clusters", [6, 16])
def test_search_without_isolated_nodes_matches_the_whole_graph_search(graph, clusters):
    """Leaving the isolated nodes out changes only the random path (Leiden shuffles all nodes): the
    search on the whole graph reaches the same count with the same modularity (±0.01)."""
    _, _, _, (n, src, dst, w) = graph
    big, slots, bsrc, bdst = _with_isolated(n, src, dst)
    g = ig.Graph(n=big, edges=np.column_stack([bsrc, bdst]).tolist(), directed=False)
    active = np.zeros(big, dtype=bool)
    active[slots] = True
    whole = search_resolution(g, w.tolist(), active, clusters, min_size=5, seed=0)
    sub = communities(big, bsrc, bdst, w, clusters=clusters, min_size=5, seed=0)
    count, mod = _modularity(g, w.tolist(), whole.raw, active)
    assert count == sub.n_clusters == clusters
    assert mod == pytest.approx(sub.info["modularity"], abs=0.01)


def test_search_leaves_igraphs_generator_as_it_was(graph):
    """The search seeds igraph's Leiden with its own generator and puts python-igraph's default (the
    `random` module) back: a seeded igraph routine after it draws what it drew before."""
    _, _, _, (n, src, dst, w) = graph

    def draw() -> list:
        random.seed(7)
        return ig.Graph.Erdos_Renyi(n=40, p=0.1).get_edgelist()

    before = draw()
    communities(n, src, dst, w, clusters=10, min_size=5, seed=0)
    assert draw() == before
