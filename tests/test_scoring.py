"""Fused top-k: the grouped fast path against the dense reference, and the fusion semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhr.ranking.scoring import ScoringPlan, dense_fused_topk, grouped_fused_topk, plan_for
from tests.helpers import dot

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(q: torch.Tensor, items: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    qn = torch.nn.functional.normalize(q, dim=-1)
    en = torch.nn.functional.normalize(items, dim=-1)
    return qn @ en.T / temperature


def random_eligibility(rng: np.random.Generator, n_heads: int, n_cols: int) -> torch.Tensor:
    """A mix of head kinds: all-item heads, multi-label categories, and some items with no head."""
    elig = np.zeros((n_heads, n_cols), dtype=bool)
    for h in range(n_heads):
        kind = rng.integers(3)
        if kind == 0 and n_heads > 1:
            elig[h] = True
        else:
            elig[h] = rng.random(n_cols) < rng.uniform(0.05, 0.6)
    elig[:, rng.random(n_cols) < 0.05] = False  # items no head may score
    elig[:, 0] = True  # padding: the functions must ignore it anyway
    return torch.from_numpy(elig)


def history(rng: np.random.Generator, b: int, n_cols: int, as_csr: bool):
    mask = rng.random((b, n_cols)) < 0.1
    if not as_csr:
        return torch.from_numpy(mask)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))])
    return indptr, np.nonzero(mask)[1]


def assert_same(a, b) -> None:
    items_a, scores_a, win_a = a
    items_b, scores_b, win_b = b
    assert torch.equal(items_a, items_b)
    finite = torch.isfinite(scores_a)
    assert torch.equal(finite, torch.isfinite(scores_b))
    assert torch.allclose(scores_a[finite], scores_b[finite], atol=1e-5, rtol=1e-5)
    assert torch.equal(win_a, win_b)


@pytest.mark.parametrize("n_heads", [1, 3, 16])
@pytest.mark.parametrize("fusion", ["max", "avg"])
def test_grouped_equals_dense(n_heads: int, fusion: str) -> None:
    for seed in range(20):
        rng = np.random.default_rng(seed * 100 + n_heads)
        b, d, n_cols = int(rng.integers(1, 9)), 8, int(rng.integers(5, 400))
        q = torch.from_numpy(rng.normal(size=(b, n_heads, d)).astype(np.float32))
        vecs = torch.from_numpy(rng.normal(size=(n_cols, d)).astype(np.float32))
        elig = random_eligibility(rng, n_heads, n_cols)
        user_heads = torch.from_numpy(rng.random((b, n_heads)) < 0.7) if seed % 2 else None
        exclude = history(rng, b, n_cols, as_csr=seed % 3 == 0) if seed % 3 != 1 else None
        k = int(rng.choice([1, 10, n_cols + 5]))
        score_fn = cosine if seed % 2 else dot
        # small blocks so that both blocks and the rare-pattern path are exercised
        plan = ScoringPlan(elig, min_block_items=int(rng.choice([1, 4, 10_000])))
        dense = dense_fused_topk(q, vecs, score_fn, elig, user_heads, exclude, k, fusion)
        # slabs of a few positions: the running top-k is merged across many slabs
        slab = [None, 1, 5, 37][seed % 4]
        grouped = grouped_fused_topk(q, vecs, score_fn, plan, user_heads, exclude, k, fusion, batch_size=3,
                                     slab=slab)
        assert_same(dense, grouped)


@pytest.mark.parametrize("fusion", ["max", "avg"])
def test_ties_break_by_head_then_item_id(fusion: str) -> None:
    # integer vectors make scores exact, so every tie is a true tie in both paths
    rng = np.random.default_rng(0)
    n_cols, n_heads = 60, 4
    q = torch.from_numpy(rng.integers(-1, 2, size=(5, n_heads, 3)).astype(np.float32))
    vecs = torch.from_numpy(rng.integers(-1, 2, size=(n_cols, 3)).astype(np.float32))
    elig = random_eligibility(rng, n_heads, n_cols)
    for min_items in (1, 1000):
        dense = dense_fused_topk(q, vecs, dot, elig, None, None, 7, fusion)
        for slab in (None, 1, 4, 13):  # ties across slabs too
            grouped = grouped_fused_topk(q, vecs, dot, ScoringPlan(elig, min_items), None, None, 7, fusion,
                                         slab=slab)
            assert_same(dense, grouped)
        items, scores, _ = dense
        for row_items, row_scores in zip(items.tolist(), scores.tolist(), strict=True):
            keyed = [(-s, i) for i, s in zip(row_items, row_scores, strict=True) if i]
            assert keyed == sorted(keyed)  # score desc, then item id asc


def test_one_head_max_equals_avg_equals_plain_scoring() -> None:
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.normal(size=(4, 1, 6)).astype(np.float32))
    vecs = torch.from_numpy(rng.normal(size=(50, 6)).astype(np.float32))
    elig = torch.ones(1, 50, dtype=torch.bool)
    plain = cosine(q[:, 0], vecs)
    plain[:, 0] = float("-inf")
    want_scores, want_items = plain.topk(10, dim=1)
    for fn in (dense_fused_topk, grouped_fused_topk):
        for fusion in ("max", "avg"):
            items, scores, winners = fn(q, vecs, cosine, elig, None, None, 10, fusion)
            assert torch.equal(items, want_items)
            assert torch.allclose(scores, want_scores, atol=1e-5)
            assert (winners == (0 if fusion == "max" else -1)).all()


def test_history_items_and_padding_never_recommended() -> None:
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.normal(size=(3, 2, 4)).astype(np.float32))
    vecs = torch.from_numpy(rng.normal(size=(30, 4)).astype(np.float32))
    elig = torch.ones(2, 30, dtype=torch.bool)
    hist = [[1, 2, 3], [], [5, 29]]
    indptr = np.array([0, 3, 3, 5])
    items_csr = np.array([1, 2, 3, 5, 29])
    for fn in (dense_fused_topk, grouped_fused_topk):
        items, scores, _ = fn(q, vecs, dot, elig, None, (indptr, items_csr), 40, "max")
        for u in range(3):
            got = set(items[u][torch.isfinite(scores[u])].tolist())
            assert got == set(range(1, 30)) - set(hist[u])
            assert (items[u][~torch.isfinite(scores[u])] == 0).all()  # padding slots


def test_item_without_eligible_head_never_appears() -> None:
    rng = np.random.default_rng(3)
    q = torch.from_numpy(rng.normal(size=(4, 3, 4)).astype(np.float32))
    vecs = torch.from_numpy(rng.normal(size=(20, 4)).astype(np.float32))
    vecs[7] = 100 * q[:, 0].mean(0)  # item 7 would win everything if it were eligible
    elig = torch.ones(3, 20, dtype=torch.bool)
    elig[:, 7] = False
    user_heads = torch.tensor([[True, False, False]] * 4)
    elig[0, 8] = False  # item 8: only heads this user may not use
    for fn in (dense_fused_topk, grouped_fused_topk):
        for fusion in ("max", "avg"):
            items, _, winners = fn(q, vecs, dot, elig, user_heads, None, 30, fusion)
            assert not (items == 7).any() and not (items == 8).any()
            if fusion == "max":
                assert set(winners[items > 0].tolist()) == {0}


def test_avg_is_mean_over_eligible_heads() -> None:
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # head 0 scores x, head 1 scores y
    vecs = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 2.0], [0.0, 3.0]])
    elig = torch.tensor([[False, True, True, False], [False, False, True, True]])
    for fn in (dense_fused_topk, grouped_fused_topk):
        items, scores, winners = fn(q, vecs, dot, elig, None, None, 3, "avg")
        assert items.tolist() == [[1, 3, 2]] and scores.tolist() == [[4.0, 3.0, 1.5]]
        items, scores, winners = fn(q, vecs, dot, elig, None, None, 3, "max")
        assert items.tolist() == [[1, 3, 2]] and scores.tolist() == [[4.0, 3.0, 2.0]]
        assert winners.tolist() == [[0, 1, 1]]


def test_plan_groups_items_by_pattern_and_is_cached() -> None:
    elig = torch.zeros(3, 11, dtype=torch.bool)
    elig[0, 1:6] = True  # pattern {0, 2} for 1..5, {1, 2} for 6..10
    elig[1, 6:] = True
    elig[2, 1:] = True
    plan = ScoringPlan(elig, min_block_items=1)
    assert [b.heads.tolist() for b in plan.blocks] == [[0, 2], [1, 2]]
    assert plan.order.tolist() == list(range(1, 11))
    assert plan.mean_heads_per_item == 2.0
    assert plan_for(elig) is plan_for(elig.clone())


def test_unknown_fusion_rejected() -> None:
    q, vecs, elig = torch.zeros(1, 1, 2), torch.zeros(3, 2), torch.ones(1, 3, dtype=torch.bool)
    for fn in (dense_fused_topk, grouped_fused_topk):
        with pytest.raises(ValueError, match="fusion"):
            fn(q, vecs, dot, elig, None, None, 1, "median")


def test_works_with_the_model_scorer() -> None:
    heads = pytest.importorskip("mhr.models.heads")
    scorer = heads.Scorer(mode="cosine", init_temperature=0.05)
    rng = np.random.default_rng(4)
    q = torch.from_numpy(rng.normal(size=(3, 4, 8)).astype(np.float32))
    vecs = torch.from_numpy(rng.normal(size=(40, 8)).astype(np.float32))
    elig = random_eligibility(rng, 4, 40)
    for fusion in ("max", "avg"):
        assert_same(
            dense_fused_topk(q, vecs, scorer, elig, None, None, 10, fusion),
            grouped_fused_topk(q, vecs, scorer, elig, None, None, 10, fusion),
        )


# ---------------------------------------------------------------------------------------------
# calibrated / weighted fusion (mhr.ranking.fusion): per-head weights, scales and offsets


@pytest.mark.parametrize("fusion", ["max", "avg"])
@pytest.mark.parametrize("per_user", [False, True])
def test_grouped_equals_dense_with_head_parameters(fusion: str, per_user: bool) -> None:
    for seed in range(12):
        rng = np.random.default_rng(seed * 7 + per_user)
        n_heads = int(rng.choice([1, 3, 9]))
        b, d, n_cols = int(rng.integers(1, 7)), 6, int(rng.integers(5, 300))
        q = torch.from_numpy(rng.normal(size=(b, n_heads, d)).astype(np.float32))
        vecs = torch.from_numpy(rng.normal(size=(n_cols, d)).astype(np.float32))
        elig = random_eligibility(rng, n_heads, n_cols)
        user_heads = torch.from_numpy(rng.random((b, n_heads)) < 0.7) if seed % 2 else None
        exclude = history(rng, b, n_cols, as_csr=seed % 3 == 0) if seed % 3 != 1 else None
        shape = (b, n_heads) if per_user else (n_heads,)
        kw = {
            "scale": torch.from_numpy(rng.uniform(0.2, 3.0, size=shape).astype(np.float32)),
            "offset": torch.from_numpy(rng.normal(0, 2, size=shape).astype(np.float32)),
        }
        if fusion == "avg":
            kw["weights"] = torch.from_numpy(rng.uniform(0.05, 4.0, size=shape).astype(np.float32))
        for drop in (None, "scale", "offset", "weights"):
            args = {n: v for n, v in kw.items() if n != drop}
            k = int(rng.choice([1, 10, n_cols + 5]))
            plan = ScoringPlan(elig, min_block_items=int(rng.choice([1, 4, 10_000])))
            dense = dense_fused_topk(q, vecs, dot, elig, user_heads, exclude, k, fusion, **args)
            grouped = grouped_fused_topk(q, vecs, dot, plan, user_heads, exclude, k, fusion, batch_size=2,
                                         slab=[None, 2, 11][seed % 3], **args)
            assert_same(dense, grouped)


def test_head_parameters_match_the_formula() -> None:
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # head 0 scores x, head 1 scores y
    vecs = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 2.0], [0.0, 3.0]])
    elig = torch.tensor([[False, True, True, False], [False, False, True, True]])
    w, a, b = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0])
    # calibrated: item 1 -> 8 (head 0); item 2 -> head0 2, head1 2; item 3 -> head1 2.5
    for fn in (dense_fused_topk, grouped_fused_topk):
        items, scores, _ = fn(q, vecs, dot, elig, None, None, 3, "avg", weights=w, scale=a, offset=b)
        assert items.tolist() == [[1, 3, 2]] and scores.tolist() == [[8.0, 2.5, 2.0]]
        items, scores, _ = fn(q, vecs, dot, elig, None, None, 3, "avg", weights=w)
        assert items.tolist() == [[1, 3, 2]] and scores.tolist() == [[4.0, 3.0, 1.75]]  # (1·1 + 3·2) / 4
        items, scores, winners = fn(q, vecs, dot, elig, None, None, 3, "max", scale=a, offset=b)
        assert items.tolist() == [[1, 3, 2]] and scores.tolist() == [[8.0, 2.5, 2.0]]
        assert winners.tolist() == [[0, 1, 0]]  # tie at item 2: the lower head


def test_head_parameters_are_checked() -> None:
    q, vecs, elig = torch.zeros(1, 2, 2), torch.zeros(3, 2), torch.ones(2, 3, dtype=torch.bool)
    for fn in (dense_fused_topk, grouped_fused_topk):
        with pytest.raises(ValueError, match="weights"):
            fn(q, vecs, dot, elig, None, None, 1, "max", weights=torch.ones(2))
        with pytest.raises(ValueError, match="> 0"):
            fn(q, vecs, dot, elig, None, None, 1, "avg", weights=torch.tensor([1.0, 0.0]))
        with pytest.raises(ValueError, match="K = 2"):
            fn(q, vecs, dot, elig, None, None, 1, "avg", offset=torch.ones(3))
