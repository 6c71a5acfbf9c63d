"""Heads: layout, zero init, hierarchical sharing, compatibility semantics, scorer, and the max/avg
fusion of their scores (`mhr.ranking.fusion`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhr.errors import UsageError
from mhr.models.heads import (
    COMPOSITIONS,
    Compatibility,
    PriorHeads,
    Scorer,
    build_layout,
    parameter_count,
    tree_levels,
)
from mhr.priors.spec import PriorSpec
from mhr.ranking.fusion import fuse_avg, fuse_max

N_ITEMS, N_USERS, TAU, D = 12, 6, 4, 8
EVENT_VOCAB = [None, "view", "like", "buy", "share"]  # "share" is mapped by no group


def _items(groups: list[set[int]]) -> np.ndarray:
    mat = np.zeros((len(groups), N_ITEMS + 1), dtype=bool)
    for g, members in enumerate(groups):
        mat[g, sorted(members)] = True
    return mat


def tiny_priors() -> dict[str, PriorSpec]:
    """12 items in 3 multi-label categories (4, 5, 8 in two), 2 graph communities, 2 horizon
    segments over τ = 4, 2 event groups, 2 user groups (user 5 in none)."""
    return {
        "item": PriorSpec("item", "item", "k-item", ("Action", "Comedy", "Drama"), {},
                          item_groups=_items([{1, 2, 3, 4, 5}, {4, 5, 6, 7, 8}, {8, 9, 10, 11, 12}])),
        "graph": PriorSpec("graph", "graph", "k-graph", ("c0", "c1"), {},
                           item_groups=_items([set(range(1, 7)), set(range(7, 13))])),
        "temporal": PriorSpec("temporal", "temporal", "k-temp", ("ST", "LT"), {},
                              horizon_groups=np.array([0, 0, 1, 1], dtype=np.int64)),
        "event": PriorSpec("event", "event", "k-event", ("browse", "engage"), {},
                           event_groups={None: 0, "view": 0, "like": 1, "buy": 1}),
        "user": PriorSpec("user", "user", "k-user", ("young", "old"), {},
                          user_groups=np.array([-1, 0, 1, 0, 1, -1, 0], dtype=np.int64)),
    }


def layouts():
    """(compose, prior names, global head) covering every composition and kind."""
    return [
        ("flat", ["item"], False),
        ("flat", ["temporal"], True),
        ("additive", ["item", "temporal"], False),
        ("additive", ["item", "event"], True),
        ("multiplicative", ["temporal", "item"], False),
        ("multiplicative", ["item", "graph"], True),
        ("hierarchical", ["temporal", "item"], False),
        ("hierarchical", ["item", "graph", "event"], True),
        ("hierarchical", ["user", "item"], False),
        ("multiplicative", ["event", "user", "temporal"], False),
        ("hierarchical", [], False),
    ]


def make_layout(compose, names, global_head=False):
    priors = tiny_priors()
    return build_layout([priors[n] for n in names], compose, global_head)


def random_batch(seed=0, batch=3, length=5, tau=TAU):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, N_ITEMS + 1, (batch, length, tau), generator=g)
    events = torch.randint(0, len(EVENT_VOCAB), (batch, length, tau), generator=g)
    users = torch.tensor([1, 2, 5, 3, 4, 6][:batch])
    return targets, events, users


# ---------------------------------------------------------------------------------------------
# layout


def test_no_priors_is_one_global_head():
    for compose in COMPOSITIONS:
        layout = build_layout([], compose)
        assert layout.n_heads == 1 and layout.names == ("global",) and layout.leaves == ()
        heads = PriorHeads(D, layout)
        h = torch.randn(2, 3, D)
        assert torch.equal(heads(h), h.unsqueeze(-2))
        assert parameter_count(layout, D) == 0


def test_layout_shapes_and_names():
    p = tiny_priors()
    flat = build_layout([p["item"]], "flat")
    assert flat.names == ("Action", "Comedy", "Drama") and flat.n_heads == 3
    add = build_layout([p["item"], p["temporal"]], "additive", global_head=True)
    assert add.names == ("Action", "Comedy", "Drama", "ST", "LT", "global") and add.n_heads == 6
    assert add.leaves[3] == ((1, 0),)
    hier = build_layout([p["temporal"], p["item"]], "hierarchical")
    assert hier.names[:4] == ("ST · Action", "ST · Comedy", "ST · Drama", "LT · Action")
    assert hier.leaves[1] == ((0, 0), (1, 1)) and hier.n_heads == 6
    with pytest.raises(UsageError):
        build_layout([p["item"], p["temporal"]], "flat")
    with pytest.raises(UsageError):
        build_layout([p["item"]], "stacked")
    assert "hierarchical over temporal × item: 6 heads" in hier.describe(D)


def test_empty_intersections_are_dropped_and_reported():
    p = tiny_priors()
    layout = build_layout([p["item"], p["graph"]], "multiplicative")
    assert layout.dropped == ("Action · c1", "Drama · c0")
    assert layout.names == ("Action · c0", "Comedy · c0", "Comedy · c1", "Drama · c1")
    kept = build_layout([p["item"], p["graph"]], "multiplicative", drop_empty=False)
    assert kept.n_heads == 6 and kept.dropped == ()


def test_colliding_names_are_qualified():
    p = tiny_priors()
    twin = PriorSpec("item2", "item", "k2", ("Action", "Other"), {}, item_groups=_items([{1}, {2}]))
    layout = build_layout([p["item"], twin], "additive")
    assert layout.names[0] == "item:Action" and layout.names[3] == "item2:Action"


def test_tree_levels_prefixes():
    layout = make_layout("hierarchical", ["temporal", "item"])
    (p1, g1), (p2, g2) = tree_levels(layout.leaves)
    assert p1 == [0, 0] and g1 == [0, 1]  # ST, LT under the root
    assert p2 == [0, 0, 0, 1, 1, 1] and g2 == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------------------------------------
# heads


@pytest.mark.parametrize("compose,names,global_head", layouts())
def test_every_head_equals_h_at_init(compose, names, global_head):
    layout = make_layout(compose, names, global_head)
    heads = PriorHeads(D, layout)
    for p in heads.parameters():
        assert torch.count_nonzero(p) == 0  # weights, biases and group embeddings
    h = torch.randn(2, 5, D)
    q = heads(h)
    assert q.shape == (2, 5, layout.n_heads, D)
    assert torch.equal(q, h.unsqueeze(-2).expand_as(q))
    assert sum(p.numel() for p in heads.parameters()) == parameter_count(layout, D)


@pytest.mark.parametrize("compose,names,global_head", layouts())
def test_selected_queries_equal_dense_heads_and_give_the_same_loss(compose, names, global_head):
    """The fast training path (only the queries the loss reads, `queries_at`) against the dense
    reference (every head at every position): same queries, same loss, same gradients."""
    from mhr.models.heads import SelectedQueries, dot_scores
    from mhr.training.loss import multihead_loss

    layout = make_layout(compose, names, global_head)
    torch.manual_seed(1)
    heads = PriorHeads(D, layout)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(3, 5, D, requires_grad=True)
    dense = heads(h)
    k = layout.n_heads
    pos = torch.randint(0, 15, (40,))
    head = torch.randint(0, k, (40,))
    torch.testing.assert_close(heads.queries_at(h.reshape(-1, D), pos, head), dense.reshape(-1, k, D)[pos, head])

    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    targets = torch.randint(0, N_ITEMS + 1, (3, 5, TAU))
    events = torch.randint(0, len(EVENT_VOCAB), (3, 5, TAU))
    ct = compat.targets(targets, events, torch.tensor([1, 2, 5]))
    items = torch.randn(N_ITEMS + 1, D, requires_grad=True)
    scorer = Scorer("cosine", 0.1)
    results = []
    for selected in (False, True):
        for t in (h, items, *heads.parameters(), *scorer.parameters()):
            t.grad = None
        if selected:
            q = SelectedQueries(heads, h, scorer.prepare_queries)
        else:
            q = scorer.prepare_queries(heads(h))
        loss, _ = multihead_loss(q, scorer.prepare_items(items), dot_scores, targets, ct, compat.omega, gamma=0.9)
        if selected:
            loss = loss + q.anchor()
        loss.backward()
        grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                 for t in (h, items, *heads.parameters(), *scorer.parameters())]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compose", ["additive", "multiplicative"])
def test_independent_heads_match_a_loop(compose):
    layout = make_layout(compose, ["temporal", "item"], True)
    heads = PriorHeads(D, layout)
    torch.manual_seed(0)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(4, D)
    q = heads(h)
    for k in range(len(layout.leaves)):
        ref = h + torch.nn.functional.silu(h @ heads.weight[k].t() + heads.bias[k])
        torch.testing.assert_close(q[:, k], ref)
    assert torch.equal(q[:, -1], h)


def test_hierarchical_matches_a_loop_and_shares_what_it_should():
    layout = make_layout("hierarchical", ["temporal", "item"], True)
    heads = PriorHeads(D, layout)
    torch.manual_seed(1)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(3, D)
    q = heads(h)
    silu = torch.nn.functional.silu
    for k, ((_, g1), (_, g2)) in enumerate(layout.leaves):
        z1 = h + silu(h @ heads.weights[0][g1].t() + heads.biases[0][g1]) + heads.groups[0][g1]
        node = k  # level-2 nodes are the leaves, in order
        z2 = z1 + silu(z1 @ heads.weights[1][node].t() + heads.biases[1][node]) + heads.groups[1][g2]
        torch.testing.assert_close(q[:, k], z2)
    assert torch.equal(q[:, -1], h)
    # the level-2 group embedding of "Comedy" is shared by ST · Comedy and LT · Comedy only
    with torch.no_grad():
        heads.groups[1][1] += 1.0
    moved = (heads(h) - q).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == [False, True, False, False, True, False, False]
    # the ST adapter (path prefix) reaches the ST leaves only
    with torch.no_grad():
        heads.groups[1][1] -= 1.0
        heads.weights[0][0] += 0.5
    moved = (heads(h) - q).abs().amax(dim=(0, 2)) > 1e-6
    assert moved.tolist() == [True, True, True, False, False, False, False]


def test_heads_gradients_flow():
    layout = make_layout("hierarchical", ["item", "temporal"])
    heads = PriorHeads(D, layout)
    h = torch.randn(2, 3, D, requires_grad=True)
    heads(h).pow(2).sum().backward()
    assert h.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


# ---------------------------------------------------------------------------------------------
# scorer


def test_scorer_cosine_and_dot():
    q, items = torch.randn(2, 3, D), torch.randn(N_ITEMS + 1, D)
    cos = Scorer("cosine", init_temperature=0.05)
    ref = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(items, dim=-1).t() / 0.05
    torch.testing.assert_close(cos(q, items), ref)
    assert abs(cos.temperature - 0.05) < 1e-6
    assert [n for n, _ in cos.named_parameters()] == ["log_scale"]
    assert list(Scorer("cosine", learn_temperature=False).parameters()) == []
    dot = Scorer("dot")
    torch.testing.assert_close(dot(q, items), q @ items.t())
    # batched candidates: items [..., M, d]
    cand = torch.randn(2, 5, D)
    torch.testing.assert_close(cos(q[:, :1], cand).squeeze(1), torch.stack([cos(q[i, 0], cand[i]) for i in range(2)]))
    with pytest.raises(UsageError):
        Scorer("l2")
    with torch.no_grad():
        cos.log_scale.fill_(100.0)
    assert cos.temperature == pytest.approx(Scorer.MIN_T)


# ---------------------------------------------------------------------------------------------
# compatibility


def _brute_item_set(layout, leaf):
    ok = np.ones(N_ITEMS + 1, dtype=bool)
    for p, g in leaf:
        spec = layout.priors[p]
        if spec.kind in ("item", "graph"):
            ok &= spec.item_groups[g]
    ok[0] = False
    return ok


def _brute_targets(layout, targets, events, users):
    B, L, T = targets.shape
    out = np.zeros((B, L, T, layout.n_heads), dtype=bool)
    for b in range(B):
        for t in range(L):
            for j in range(T):
                item = int(targets[b, t, j])
                if item == 0:
                    continue
                event = EVENT_VOCAB[int(events[b, t, j])] if int(events[b, t, j]) else None
                for k in range(layout.n_heads):
                    if k == len(layout.leaves):  # the global head
                        out[b, t, j, k] = True
                        continue
                    ok = True
                    for p, g in layout.leaves[k]:
                        spec = layout.priors[p]
                        if spec.kind in ("item", "graph"):
                            ok &= bool(spec.item_groups[g, item])
                        elif spec.kind == "event":
                            ok &= spec.event_groups.get(event, -1) == g
                        elif spec.kind == "temporal":
                            ok &= int(spec.horizon_groups[j]) == g
                        else:
                            ok &= int(spec.user_groups[int(users[b])]) == g
                    out[b, t, j, k] = ok
    return out


@pytest.mark.parametrize("compose,names,global_head", layouts())
def test_compatibility_against_brute_force(compose, names, global_head):
    layout = make_layout(compose, names, global_head)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB, horizon=TAU)
    assert compat.omega.shape == (layout.n_heads, N_ITEMS + 1) and not compat.omega[:, 0].any()
    for k, leaf in enumerate(layout.leaves):
        assert np.array_equal(compat.omega[k].numpy(), _brute_item_set(layout, leaf))
    if layout.global_head:
        assert compat.omega[-1, 1:].all()
    targets, events, users = random_batch(seed=len(names) + len(compose))
    got = compat.targets(targets, events, users)
    assert np.array_equal(got.numpy(), _brute_targets(layout, targets, events, users))


def test_leaf_sets_are_intersections():
    p = tiny_priors()
    for compose in ("multiplicative", "hierarchical"):
        layout = build_layout([p["item"], p["graph"]], compose)
        omega = Compatibility(layout, N_ITEMS, EVENT_VOCAB).omega
        expected = {
            "Action · c0": {1, 2, 3, 4, 5}, "Comedy · c0": {4, 5, 6},
            "Comedy · c1": {7, 8}, "Drama · c1": {8, 9, 10, 11, 12},
        }
        for k, name in enumerate(layout.names):
            assert set(torch.nonzero(omega[k]).flatten().tolist()) == expected[name]


def test_non_item_levels_allow_every_item():
    layout = make_layout("multiplicative", ["event", "user", "temporal"])
    omega = Compatibility(layout, N_ITEMS, EVENT_VOCAB).omega
    assert omega[:, 1:].all() and not omega[:, 0].any()


def test_user_heads():
    layout = make_layout("hierarchical", ["user", "item"], True)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    usable = compat.users(torch.tensor([1, 2, 5, 99]))
    young = torch.tensor([n.startswith("young") for n in layout.names[:-1]] + [True])
    old = torch.tensor([n.startswith("old") for n in layout.names[:-1]] + [True])
    assert torch.equal(usable[0], young) and torch.equal(usable[1], old)
    assert usable[2].all() and usable[3].all()  # no group / unknown user: every head
    no_user = Compatibility(make_layout("flat", ["item"]), N_ITEMS, EVENT_VOCAB)
    assert no_user.users(torch.tensor([1, 2])).all()


def test_horizon_longer_than_temporal_prior_is_an_error():
    layout = make_layout("flat", ["temporal"])
    with pytest.raises(UsageError, match="horizon"):
        Compatibility(layout, N_ITEMS, EVENT_VOCAB, horizon=TAU + 1)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    targets, events, users = random_batch(tau=TAU + 1)
    with pytest.raises(UsageError):
        compat.targets(targets, events, users)


def test_compatibility_to_device_and_unreachable():
    layout = make_layout("multiplicative", ["item", "graph"])
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB).to("cpu")
    assert compat.device == torch.device("cpu")
    assert compat.unreachable_items().tolist() == []
    p = tiny_priors()
    sparse = PriorSpec("item", "item", "k", ("a",), {}, item_groups=_items([{1, 2}]))
    assert Compatibility(build_layout([sparse], "flat"), N_ITEMS).unreachable_items().tolist() == list(range(3, 13))
    assert Compatibility(build_layout([p["item"]], "flat"), N_ITEMS - 2).omega.shape == (3, N_ITEMS - 1)


# ---------------------------------------------------------------------------------------------
# fusion and masking


def _trained(layout, seed=0):
    heads = PriorHeads(D, layout)
    torch.manual_seed(seed)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return heads


@pytest.mark.parametrize("compose,names,global_head", layouts())
def test_a_head_never_ranks_outside_its_set(compose, names, global_head):
    layout = make_layout(compose, names, global_head)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    heads, scorer = _trained(layout), Scorer()
    items = torch.randn(N_ITEMS + 1, D)
    scores = scorer(heads(torch.randn(4, D)), items)  # [4, K, N+1]
    for k in range(layout.n_heads):
        fused, winner = fuse_max(scores[:, k : k + 1], compat.omega[k : k + 1])
        top = fused.topk(N_ITEMS + 1, dim=1)
        finite = torch.isfinite(top.values)
        assert compat.omega[k, top.indices[finite]].all()
        assert finite.sum(1).eq(int(compat.omega[k].sum())).all()
    fused, winner = fuse_max(scores, compat.omega)
    ok = winner >= 0
    assert compat.omega[winner[ok], torch.nonzero(ok)[:, 1]].all()
    assert (winner[:, 0] == -1).all() and torch.isneginf(fused[:, 0]).all()


def test_fusion_with_one_head_is_plain_scoring():
    scores = torch.randn(3, 1, N_ITEMS + 1)
    elig = torch.ones(1, N_ITEMS + 1, dtype=torch.bool)
    for fuse in (fuse_max, fuse_avg):
        fused, _ = fuse(scores, elig)
        assert torch.equal(fused, scores[:, 0])
    fused, winner = fuse_max(scores, elig)
    assert (winner == 0).all()


def test_fusion_max_avg_and_no_eligible_head():
    scores = torch.tensor([[[1.0, 5.0, 2.0, 3.0], [4.0, 1.0, 2.0, 9.0]]])  # [1, 2, 4]
    elig = torch.tensor([[True, True, False, False], [True, False, True, False]])
    fused, winner = fuse_max(scores, elig)
    assert fused.tolist() == [[4.0, 5.0, 2.0, float("-inf")]] and winner.tolist() == [[1, 0, 1, -1]]
    fused, winner = fuse_avg(scores, elig)
    assert fused.tolist() == [[2.5, 5.0, 2.0, float("-inf")]] and (winner == -1).all()
    per_user = elig.unsqueeze(0).clone()
    per_user[0, 1, 0] = False
    fused, winner = fuse_max(scores, per_user)
    assert fused[0, 0] == 1.0 and winner[0, 0] == 0
    tie = torch.zeros(1, 3, 2)
    assert fuse_max(tie, torch.ones(3, 2, dtype=torch.bool))[1].eq(0).all()  # ties: lowest head
