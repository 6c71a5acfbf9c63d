"""Metrics (docs/ARCHITECTURE.md, "Evaluation protocol") on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mhr.ranking.metrics import (
    coverage,
    entropy_at_k,
    has_targets,
    head_usage,
    masked_mean,
    mean_ci,
    ndcg_at_k,
    new_interest_mask,
    recall_at_k,
)


def d(j: int) -> float:
    """Discount of 0-based place j."""
    return 1 / math.log2(j + 2)


def test_perfect_ranking_scores_one() -> None:
    assert recall_at_k([3, 1, 2, 9], [1, 2, 3], 3) == 1.0
    assert ndcg_at_k([3, 1, 2, 9], [1, 2, 3], 3) == pytest.approx(1.0)
    assert ndcg_at_k([3, 1, 2, 9], [1, 2, 3], 10) == pytest.approx(1.0)


def test_known_ranking_by_hand() -> None:
    ranked, targets = [5, 7, 2, 8, 1], [2, 1, 4]
    # hits at places 2 and 4; IDCG over min(3, 5) = 3 places
    want = (d(2) + d(4)) / (d(0) + d(1) + d(2))
    assert ndcg_at_k(ranked, targets, 5) == pytest.approx(want)
    assert ndcg_at_k(ranked, targets, 5) == pytest.approx(0.41618, abs=1e-5)  # 0.88685 / 2.13093
    assert recall_at_k(ranked, targets, 5) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, targets, 2) == 0.0


def test_idcg_with_fewer_targets_than_k() -> None:
    # one target found at place 1 of a top-10: IDCG counts a single place
    assert ndcg_at_k([4, 6, 1, 2], [6], 10) == pytest.approx(d(1) / d(0))
    assert recall_at_k([4, 6, 1, 2], [6], 10) == 1.0


def test_empty_targets_give_zero_and_are_masked() -> None:
    ranked = np.array([[1, 2, 3], [1, 2, 3]])
    targets = np.array([[0, 0], [2, 0]])
    rec, ndcg = recall_at_k(ranked, targets, 3), ndcg_at_k(ranked, targets, 3)
    assert rec.tolist() == [0.0, 1.0] and not np.isnan(ndcg).any()
    assert has_targets(targets).tolist() == [False, True]
    assert masked_mean(rec, has_targets(targets)) == 1.0
    assert masked_mean(rec, [False, False]) == 0.0


def test_k_above_catalogue_size() -> None:
    # a 3-item catalogue ranked completely; K = 10
    assert recall_at_k([2, 3, 1], [1, 3], 10) == 1.0
    assert ndcg_at_k([2, 3, 1], [1, 3], 10) == pytest.approx((d(1) + d(2)) / (d(0) + d(1)))
    # padding 0 in the ranking never matches 0-padded targets
    assert recall_at_k([2, 0, 0], [5, 0], 10) == 0.0


def test_duplicate_targets_count_once() -> None:
    assert recall_at_k([7, 1, 2], [7, 7, 3], 3) == pytest.approx(1 / 2)
    assert ndcg_at_k([7, 1, 2], [7, 7], 3) == pytest.approx(1.0)
    # a repeated item in the ranking scores once
    assert ndcg_at_k([7, 7, 3], [7, 3], 3) == pytest.approx((d(0) + d(2)) / (d(0) + d(1)))
    assert recall_at_k([7, 7], [7, 3], 2) == pytest.approx(1 / 2)


def test_batched_equals_per_user_and_horizons() -> None:
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(np.arange(1, 30))[:12] for _ in range(20)])
    targets = rng.integers(0, 30, size=(20, 4))
    for k in (1, 5, 50):
        for h in (1, 2, 4):
            batch = ndcg_at_k(ranked, targets, k, horizon=h)
            single = [ndcg_at_k(r, t[:h], k) for r, t in zip(ranked, targets, strict=True)]
            assert np.allclose(batch, single)
            assert np.allclose(
                recall_at_k(ranked, targets, k, horizon=h),
                [recall_at_k(r, t[:h], k) for r, t in zip(ranked, targets, strict=True)],
            )


def test_entropy_by_hand() -> None:
    groups = np.zeros((3, 6), dtype=bool)
    groups[0, [1, 2]] = True
    groups[1, [3, 4]] = True
    groups[2, [4]] = True  # item 4 is in two categories: half a count each
    # item 5: no category
    assert entropy_at_k([1, 2], groups, 2) == 0.0
    assert entropy_at_k([1, 3], groups, 2) == pytest.approx(math.log(2))
    assert entropy_at_k([1, 3], groups, 2, base=2) == pytest.approx(1.0)
    p = np.array([1, 0.5, 0.5]) / 2
    assert entropy_at_k([1, 4, 5], groups, 3) == pytest.approx(-(p * np.log(p)).sum())
    assert entropy_at_k([5, 0], groups, 2) == 0.0
    assert entropy_at_k(np.array([[1, 3], [1, 2]]), groups, 2).tolist() == pytest.approx([math.log(2), 0.0])


def test_coverage_and_head_usage() -> None:
    ranked = np.array([[1, 2, 3], [1, 4, 0]])
    assert coverage(ranked, 10, 2) == pytest.approx(3 / 10)
    assert coverage(ranked, 10, 3) == pytest.approx(4 / 10)
    winners = np.array([[0, 2, -1], [2, 2, 1]])
    assert head_usage(winners, 3).tolist() == [1, 1, 3]
    assert head_usage(winners, 3, k=1).tolist() == [1, 0, 1]


def test_new_interest() -> None:
    groups = np.zeros((2, 5), dtype=bool)
    groups[0, [1, 2]] = True
    groups[1, [3, 4]] = True
    ptr = np.array([0, 2, 3, 3])
    hist = np.array([1, 2, 3])  # user 0 saw only category 0, user 1 only category 1, user 2 nothing
    targets = np.array([[2, 3], [4, 0], [1, 0]])
    assert new_interest_mask(ptr, hist, targets, groups).tolist() == [True, False, True]


def test_mean_ci_against_t_interval() -> None:
    values = np.array([0.10, 0.12, 0.11, 0.13])
    mean, half = mean_ci(values)
    # t_{0.975, 3} = 3.182446; s = 0.0129099
    assert mean == pytest.approx(0.115)
    assert half == pytest.approx(3.182446305 * 0.01290994449 / 2, rel=1e-6)
    assert mean_ci(values, 0.99)[1] > half
    assert math.isnan(mean_ci([0.5])[1]) and mean_ci([0.5])[0] == 0.5
