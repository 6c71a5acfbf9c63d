"""Fitted fusions (mhr.ranking.fusion): the dense formula, learned calibration and inverse-variance weights,
checked at the scoring level on hand-built queries and item vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhr.ranking import fusion
from mhr.ranking.fusion import fuse_avg, fuse_max
from mhr.ranking.metrics import ndcg_at_k
from mhr.ranking.scoring import dense_fused_topk, grouped_fused_topk
from tests.helpers import dot

pytestmark = pytest.mark.usefixtures("one_thread")


def ndcg(q, vecs, elig, targets, exclude=None, **kw) -> float:
    items, _, _ = grouped_fused_topk(q, vecs, dot, elig, None, exclude, 10, "avg", **kw)
    return float(np.mean(ndcg_at_k(items.numpy(), np.asarray(targets), 10)))


def fit_kwargs(scale, offset) -> dict:
    return {"scale": torch.tensor(scale, dtype=torch.float32), "offset": torch.tensor(offset, dtype=torch.float32)}


def planted(seed: int, n_users: int = 300, n_items: int = 120, d: int = 8):
    """Users with a taste vector; each user's targets are the items it likes best (plus noise)."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(n_users, d)).astype(np.float32)
    vecs = rng.normal(size=(n_items + 1, d)).astype(np.float32)
    vecs[0] = 0
    util = taste @ vecs[1:].T + rng.gumbel(size=(n_users, n_items)) * 0.5
    targets = np.argsort(-util, axis=1)[:, :2] + 1
    return rng, torch.from_numpy(taste), torch.from_numpy(vecs), targets


# ---------------------------------------------------------------------------------------------
# the formula


def test_fuse_dense_without_parameters_is_the_papers_max_and_avg() -> None:
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.normal(size=(3, 4, 20)).astype(np.float32))
    allowed = torch.from_numpy(rng.random((3, 4, 20)) < 0.5)
    for mine, ref in ((fusion.fuse_dense(s, allowed, "max"), fuse_max(s, allowed)),
                      (fusion.fuse_dense(s, allowed, "avg"), fuse_avg(s, allowed))):
        assert torch.equal(mine[1], ref[1]) and torch.equal(mine[0], ref[0])


def test_calibrated_mean_used_by_the_fit_is_the_scoring_formula() -> None:
    rng = np.random.default_rng(1)
    n_users, n_heads, n_cols, d = 5, 3, 40, 4
    q = torch.from_numpy(rng.normal(size=(n_users, n_heads, d)))
    vecs = torch.from_numpy(rng.normal(size=(n_cols, d)))
    elig = torch.from_numpy(rng.random((n_heads, n_cols)) < 0.5)
    elig[:, 0] = False
    user_heads = torch.from_numpy(rng.random((n_users, n_heads)) < 0.8)
    log_a, b = torch.from_numpy(rng.normal(size=n_heads)), torch.from_numpy(rng.normal(size=n_heads))
    scores, head, item = fusion.flat_head_scores(q, vecs, dot, elig)
    assert scores.shape == (n_users, int(elig.sum())) and torch.equal(elig[head, item], torch.ones_like(head).bool())
    count = user_heads.double() @ elig.double()
    mine = fusion.calibrated_mean(scores.double(), head, item, user_heads[:, head].double(), count, log_a, b, n_cols)
    allowed = elig.unsqueeze(0) & user_heads.unsqueeze(-1)
    ref, _ = fusion.fuse_dense(dot(q, vecs).float(), allowed, "avg", scale=log_a.exp(), offset=b)
    assert torch.equal(torch.isfinite(mine), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(mine[fin].float(), ref[fin], atol=1e-4)


def test_one_head_every_fusion_is_plain_scoring() -> None:
    rng, taste, vecs, targets = planted(2, n_users=40)
    q = (taste + torch.from_numpy(rng.normal(size=taste.shape).astype(np.float32))).unsqueeze(1)
    elig = torch.ones(1, vecs.shape[0], dtype=torch.bool)
    plain = dot(q[:, 0], vecs)
    plain[:, 0] = float("-inf")
    want_scores, want_items = plain.topk(10, dim=1)
    a, b, info = fusion.fit_calibration(q, vecs, dot, elig, targets)
    assert a.tolist() == [1.0] and b.tolist() == [0.0] and info["iterations"] == 0
    var, _ = fusion.head_variances([(q, None)], vecs, dot, elig)
    w = fusion.inverse_variance_weights(var)
    assert w.tolist() == [1.0]
    settings = [{}, {"weights": torch.tensor(w, dtype=torch.float32)}, fit_kwargs(a, b)]
    for fn in (dense_fused_topk, grouped_fused_topk):
        for kw in settings:
            for f in ("max", "avg"):
                if f == "max" and "weights" in kw:
                    continue
                items, scores, _ = fn(q, vecs, dot, elig, None, None, 10, f, **kw)
                assert torch.equal(items, want_items)
                assert torch.allclose(scores, want_scores, atol=1e-5)


def test_head_contributions_sum_to_the_fused_score_and_name_the_largest_term() -> None:
    rng = np.random.default_rng(3)
    s = torch.from_numpy(rng.normal(size=(3, 4, 30)).astype(np.float32))
    allowed = torch.from_numpy(rng.random((3, 4, 30)) < 0.5)
    allowed[0, :, 0] = False  # an item no head may score
    kw = {"weights": torch.tensor([1.0, 0.5, 2.0, 0.25]), "scale": torch.tensor([1.0, 2.0, 0.5, 1.5]),
          "offset": torch.tensor([0.0, -0.3, 0.2, 0.1])}
    for params in ({}, {"weights": kw["weights"]}, {"scale": kw["scale"], "offset": kw["offset"]}, kw):
        contrib, top = fusion.head_contributions(s, allowed, **params)
        fused, _ = fusion.fuse_dense(s, allowed, "avg", **params)
        some = allowed.any(dim=1)
        assert torch.allclose(contrib.sum(dim=1)[some], fused[some], atol=1e-5)
        assert not contrib[~allowed].any() and (top[~some] == -1).all() and top[0, 0] == -1
        b, i = torch.nonzero(some, as_tuple=True)
        best = contrib.masked_fill(~allowed, float("-inf")).amax(dim=1)
        assert bool(allowed[b, top[b, i], i].all())
        assert torch.equal(contrib[b, top[b, i], i], best[b, i])
    # with equal weights the largest term is the calibrated max-fusion winner, whatever the gauge
    params = {"scale": kw["scale"], "offset": kw["offset"]}
    _, top = fusion.head_contributions(s, allowed, **params)
    _, winner = fusion.fuse_dense(s, allowed, "max", **params)
    shifted = {"scale": 3 * kw["scale"], "offset": 3 * kw["offset"] + 7}
    assert torch.equal(top, winner) and torch.equal(fusion.head_contributions(s, allowed, **shifted)[1], top)


def test_scoring_args_is_the_scorer_call_of_each_fusion() -> None:
    assert fusion.scoring_args("max", None) == {"fusion": "max"}
    assert fusion.scoring_args("avg", None) == {"fusion": "avg"}
    fit = fusion.identity_fit("invvar", ["a", "b"])
    args = fusion.scoring_args("invvar", fit)
    assert args["fusion"] == "avg" and args["weights"].tolist() == [1.0, 1.0] and args["scale"] is None
    with pytest.raises(ValueError, match="fitted parameters"):
        fusion.scoring_args("learned", None)


# ---------------------------------------------------------------------------------------------
# learned


def test_learned_downweights_a_bad_head_and_improves_ndcg() -> None:
    """Two heads eligible for every item: head 0 knows the user's taste, head 1 is loud noise."""
    rng, taste, vecs, targets = planted(3)
    noise = torch.from_numpy(rng.normal(size=taste.shape).astype(np.float32)) * 3
    q = torch.stack([taste, noise], dim=1)
    elig = torch.ones(2, vecs.shape[0], dtype=torch.bool)
    fit_rows, eval_rows = np.arange(0, 200), np.arange(200, 300)
    a, b, info = fusion.fit_calibration(q[fit_rows], vecs, dot, elig, targets[fit_rows])
    assert a[0] > 5 * a[1]
    assert info["ce_learned"] < info["ce_avg_temperature"] <= info["ce_avg"]
    assert np.isclose(np.log(a).mean(), 0) and np.isclose(b.mean(), 0)  # canonical gauge
    for rows in (fit_rows, eval_rows):  # fitted rows, and held-out ones
        avg = ndcg(q[rows], vecs, elig, targets[rows])
        learned = ndcg(q[rows], vecs, elig, targets[rows], **fit_kwargs(a, b))
        assert learned > avg + 0.05


def test_learned_offsets_fix_miscalibrated_groups() -> None:
    """Disjoint category heads (one eligible head per item: a normalised weight could do nothing);
    head 1 scores everything 4 points too high, so its items crowd out head 0's under avg or max."""
    rng, taste, vecs, targets = planted(4)
    n_cols = vecs.shape[0]
    elig = torch.zeros(2, n_cols, dtype=torch.bool)
    elig[0, 1 : n_cols // 2] = True
    elig[1, n_cols // 2 :] = True
    vecs = torch.cat([vecs, torch.ones(n_cols, 1)], dim=1)  # a constant feature
    q = torch.stack([torch.cat([taste, torch.zeros(len(taste), 1)], 1),
                     torch.cat([taste, torch.full((len(taste), 1), 4.0)], 1)], dim=1)
    a, b, _ = fusion.fit_calibration(q, vecs, dot, elig, targets)
    assert b[0] - b[1] > 2  # most of the +4 taken back
    before = ndcg(q, vecs, elig, targets)
    after = ndcg(q, vecs, elig, targets, **fit_kwargs(a, b))
    assert after > before + 0.05


def test_learned_fit_is_deterministic_and_respects_history_and_user_heads(monkeypatch) -> None:
    rng, taste, vecs, targets = planted(5, n_users=80)
    q = torch.stack([taste, taste + torch.from_numpy(rng.normal(size=taste.shape).astype(np.float32))], 1)
    elig = torch.ones(2, vecs.shape[0], dtype=torch.bool)
    exclude = torch.zeros(80, vecs.shape[0], dtype=torch.bool)
    exclude[torch.arange(40), torch.from_numpy(targets[:40, 0])] = True  # a target in the history: left out
    user_heads = torch.ones(80, 2, dtype=torch.bool)
    user_heads[::3, 1] = False
    first = fusion.fit_calibration(q, vecs, dot, elig, targets, exclude, user_heads)
    second = fusion.fit_calibration(q, vecs, dot, elig, targets, exclude, user_heads)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2]["targets"] == 2 * 80 - 40
    assert np.all(np.isfinite(first[0])) and np.all(first[0] > 0)
    monkeypatch.setattr(fusion, "FIT_CHUNK_ELEMENTS", 1000)  # the loss summed over chunks of users
    chunked = fusion.fit_calibration(q, vecs, dot, elig, targets, exclude, user_heads)
    assert np.allclose(chunked[0], first[0], rtol=1e-4) and np.allclose(chunked[1], first[1], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# invvar


def test_invvar_equals_avg_when_variances_are_equal() -> None:
    rng, taste, vecs, targets = planted(6, n_users=30)
    # three heads whose scores have exactly the same spread: the same query (a sign flip, too)
    q = torch.stack([taste, taste, -taste], dim=1)
    elig = torch.ones(3, vecs.shape[0], dtype=torch.bool)
    var, users = fusion.head_variances([(q[:15], None), (q[15:], None)], vecs, dot, elig)
    assert users.tolist() == [30, 30, 30] and np.allclose(var, var[0])
    w = fusion.inverse_variance_weights(np.full(3, var[0]))
    assert w.tolist() == [1.0, 1.0, 1.0]
    for fn in (dense_fused_topk, grouped_fused_topk):
        got = fn(q, vecs, dot, elig, None, None, 10, "avg", weights=torch.tensor(w, dtype=torch.float32))
        want = fn(q, vecs, dot, elig, None, None, 10, "avg")
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


def test_invvar_weights_follow_head_variance() -> None:
    rng, taste, vecs, targets = planted(7, n_users=20)
    q = torch.stack([taste, 3 * taste], dim=1)  # head 1: 9x the variance
    elig = torch.ones(2, vecs.shape[0], dtype=torch.bool)
    var, _ = fusion.head_variances([(q, None)], vecs, dot, elig)
    assert var[1] == pytest.approx(9 * var[0], rel=1e-5)
    w = fusion.inverse_variance_weights(var)
    assert w[0] == 1.0 and w[1] == pytest.approx(1 / 9, rel=1e-5)
    # user restrictions: only users allowed to use a head count for it; undefined -> median
    allowed = torch.zeros(20, 2, dtype=torch.bool)
    allowed[:, 0] = True
    var, users = fusion.head_variances([(q, allowed)], vecs, dot, elig)
    assert users.tolist() == [20, 0] and np.isnan(var[1])
    assert fusion.inverse_variance_weights(var).tolist() == [1.0, 1.0]
    assert fusion.inverse_variance_weights([np.nan, np.nan]).tolist() == [1.0, 1.0]


def test_fit_round_trips_through_json() -> None:
    fit = fusion.FusionFit("learned", ("a", "b"), scale=(1.5, 0.5), offset=(0.25, -0.25), info={"x": 1}, key="k")
    again = fusion.FusionFit.from_json(fit.as_json())
    assert again == fit
    kw = again.scoring_kwargs()
    assert kw["weights"] is None and kw["scale"].tolist() == [1.5, 0.5]
    inv = fusion.identity_fit("invvar", ("a",))
    assert fusion.FusionFit.from_json(inv.as_json()).weights == (1.0,)
    with pytest.raises(ValueError, match="not a fitted fusion"):
        fusion.fit_settings("max")
