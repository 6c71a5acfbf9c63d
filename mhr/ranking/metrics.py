"""Ranking metrics as pure numpy functions of (ranked item ids, target item ids); the protocol is
docs/ARCHITECTURE.md, "Evaluation protocol".

Conventions shared by every function:

- `ranked [U, Kmax]` holds each user's top items, best first; `targets [U, τ]` the items the user
  went on to interact with, 0-padded. Item 0 is padding: never a hit, never a target.
- Targets are a *set*: a duplicate target counts once (|targets| = number of distinct non-zero
  ids), and a duplicate in `ranked` scores only at its first place, so every metric stays in [0, 1].
- A user with no target gets 0 (never NaN); `has_targets` gives the mask to leave such users out
  of a mean (`masked_mean`).
- `k` above `ranked.shape[1]` (e.g. a catalogue smaller than K) uses the whole list; the ideal
  DCG still counts min(|targets|, k) places, so a perfect ranking scores 1.
- 1-D inputs (one user) give a float; 2-D inputs give a per-user float64 array.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse, stats

# ---------------------------------------------------------------------------------------------
# hits


def _as_batch(ranked: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    ranked, targets = np.asarray(ranked), np.asarray(targets)
    single = ranked.ndim == 1
    if single:
        ranked, targets = ranked[None], targets[None]
    if len(ranked) != len(targets):
        raise ValueError(f"ranked has {len(ranked)} users, targets {len(targets)}")
    return ranked.astype(np.int64, copy=False), targets.astype(np.int64, copy=False), single


def _distinct_targets(targets: np.ndarray) -> np.ndarray:
    """Number of distinct non-zero ids per row: [U]."""
    t = np.sort(targets, axis=1)
    new = t != 0
    new[:, 1:] &= t[:, 1:] != t[:, :-1]
    return new.sum(1)


def _hits(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Bool [U, min(k, Kmax)]: place j holds a target seen for the first time in the list."""
    top = ranked[:, :k]
    hit = (top[:, :, None] == targets[:, None, :]).any(-1) & (top != 0)
    # a repeated item scores only at its first place
    order = np.argsort(top, axis=1, kind="stable")
    s = np.take_along_axis(top, order, 1)
    repeat = np.zeros_like(hit)
    repeat[:, 1:] = s[:, 1:] == s[:, :-1]
    first = np.ones_like(hit)
    np.put_along_axis(first, order, ~repeat, 1)
    return hit & first


def _out(values: np.ndarray, single: bool) -> np.ndarray | float:
    return float(values[0]) if single else values


def _truncate(targets: np.ndarray, horizon: int | None) -> np.ndarray:
    return targets if horizon is None else targets[:, :horizon]


# ---------------------------------------------------------------------------------------------
# accuracy


def recall_at_k(ranked, targets, k: int, horizon: int | None = None) -> np.ndarray | float:
    """Recall@K = |top-K ∩ targets| / |targets| (distinct targets; 0 for a user with none).

    `horizon` h keeps only the first h targets (the next h interactions), h ∈ {1, τ/2, τ}.
    """
    ranked, targets, single = _as_batch(ranked, targets)
    targets = _truncate(targets, horizon)
    n = _distinct_targets(targets)
    hits = _hits(ranked, targets, k).sum(1)
    return _out(np.where(n > 0, hits / np.maximum(n, 1), 0.0), single)


def ndcg_at_k(ranked, targets, k: int, horizon: int | None = None) -> np.ndarray | float:
    """NDCG@K = DCG / IDCG with binary gains:

        DCG  = Σ_{j < K, item j a target} 1 / log2(j + 2)          (j = 0-based place)
        IDCG = Σ_{j < min(|targets|, K)} 1 / log2(j + 2)

    0 for a user with no target; `horizon` as in `recall_at_k`.
    """
    ranked, targets, single = _as_batch(ranked, targets)
    targets = _truncate(targets, horizon)
    n = _distinct_targets(targets)
    hits = _hits(ranked, targets, k)
    # as long as the list or the ideal needs, never K itself (K may be far above the catalogue)
    discount = 1.0 / np.log2(np.arange(2, max(min(k, targets.shape[-1]), hits.shape[1]) + 2))
    dcg = (hits * discount[: hits.shape[1]]).sum(1)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(n, min(k, targets.shape[-1]))]
    return _out(np.where(n > 0, dcg / np.where(ideal > 0, ideal, 1.0), 0.0), single)


def has_targets(targets) -> np.ndarray | bool:
    """True for users with at least one (non-zero) target: [U] (or a bool for one user)."""
    t = np.asarray(targets)
    return bool((t != 0).any()) if t.ndim == 1 else (t != 0).any(1)


def masked_mean(values, mask) -> float:
    """Mean of `values` over `mask` (0.0 when the mask is empty, never NaN)."""
    values, mask = np.asarray(values, dtype=float), np.asarray(mask, dtype=bool)
    return float(values[mask].mean()) if mask.any() else 0.0


# ---------------------------------------------------------------------------------------------
# beyond accuracy


def entropy_at_k(ranked, item_groups: np.ndarray, k: int, base: float = math.e) -> np.ndarray | float:
    """H@K: Shannon entropy of the item-prior categories among each user's top K (nats by default).

    item_groups: bool [G, N+1] (multi-label). Each item carries mass 1, split evenly over its
    categories (1/|groups(i)| each), so a two-category item counts half for each; items with no
    category (and padding 0) carry none. p_g = mass_g / Σ mass; H = -Σ_g p_g log p_g; 0 when the
    top K has no categorised item. Range [0, log G]; `base=2` gives bits.
    """
    ranked = np.asarray(ranked)
    single = ranked.ndim == 1
    top = (ranked[None] if single else ranked)[:, :k].astype(np.int64)
    groups = np.asarray(item_groups, dtype=bool)
    per_item = groups.sum(0)
    share = np.where(per_item > 0, groups / np.maximum(per_item, 1), 0.0).T  # [N+1, G]
    share[0] = 0.0
    out = np.empty(len(top))
    step = max(1, (1 << 24) // max(1, top.shape[1] * groups.shape[0]))
    for a in range(0, len(top), step):
        mass = share[top[a : a + step]].sum(1)  # [u, G]
        total = mass.sum(1, keepdims=True)
        p = mass / np.where(total > 0, total, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        out[a : a + step] = h / math.log(base)
    return _out(np.maximum(out, 0.0), single)


def coverage(ranked, n_items: int, k: int) -> float:
    """Catalogue coverage@K: share of the items 1..N that appear in at least one user's top K."""
    top = np.asarray(ranked)[..., :k].ravel()
    top = top[(top > 0) & (top <= n_items)]
    return float(len(np.unique(top)) / n_items) if n_items > 0 else 0.0


def new_interest_mask(history_ptr, history_items, targets, item_groups: np.ndarray) -> np.ndarray:
    """Bool [U]: the user's targets hold a category that none of their history items has.

    History as CSR over the users of `targets`: user u's items are
    history_items[history_ptr[u] : history_ptr[u + 1]]. item_groups: bool [G, N+1] (multi-label; an
    item counts for every category it is in). Users with no categorised target are False.
    """
    targets = np.asarray(targets, dtype=np.int64)
    ptr = np.asarray(history_ptr, dtype=np.int64)
    n_users, n_cols = len(targets), item_groups.shape[1]
    if len(ptr) != n_users + 1:
        raise ValueError(f"history_ptr has {len(ptr)} entries for {n_users} users (need U + 1)")
    groups = sparse.csr_matrix(np.asarray(item_groups, dtype=bool).T.astype(np.int32))  # [N+1, G]
    hist = sparse.csr_matrix(
        (np.ones(len(history_items), np.int32), np.asarray(history_items, np.int64), ptr),
        shape=(n_users, n_cols),
    )
    rows = np.repeat(np.arange(n_users), targets.shape[1])
    cols = targets.ravel()
    keep = cols != 0
    tgt = sparse.csr_matrix(
        (np.ones(keep.sum(), np.int32), (rows[keep], cols[keep])), shape=(n_users, n_cols)
    )
    seen = (hist @ groups).toarray() > 0
    wanted = (tgt @ groups).toarray() > 0
    return (wanted & ~seen).any(1)


def head_usage(winners, n_heads: int, k: int | None = None) -> np.ndarray:
    """How often each head won an item in the top K under max fusion: int64 counts [n_heads].

    winners: [U, Kmax] head ids from the fused top-k (-1 = no winner: avg fusion or empty slot).
    """
    w = np.asarray(winners)[..., :k] if k is not None else np.asarray(winners)
    w = w[(w >= 0) & (w < n_heads)]
    return np.bincount(w.ravel(), minlength=n_heads).astype(np.int64)


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t confidence interval of the mean over `values` (e.g.
    seeds): half = t_{(1+c)/2, n-1} · s / √n with s the sample standard deviation (ddof=1).

    NaN values are dropped; with fewer than 2 values the half-width is NaN (undefined), and with
    none the mean is NaN too.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan")
    half = stats.t.ppf((1 + confidence) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return mean, float(half)


# ---------------------------------------------------------------------------------------------
# decoding-time objectives (`mhr.ranking.objectives`)


def group_share(ranked, member: np.ndarray, k: int) -> np.ndarray | float:
    """Exposure: the share of each user's K slots holding an item of the group (`member` bool [N+1];
    empty slots count as slots without it)."""
    ranked = np.asarray(ranked)
    single = ranked.ndim == 1
    top = (ranked[None] if single else ranked)[:, :k].astype(np.int64)
    return _out(np.asarray(member, dtype=bool)[top].sum(1) / k, single)


def quota_met(ranked, member: np.ndarray, share: float, k: int) -> np.ndarray | bool:
    """Whether each user's top K holds at least ceil(share · K) items of the group (a list whose
    candidates could not meet it counts as not met)."""
    ranked = np.asarray(ranked)
    single = ranked.ndim == 1
    top = (ranked[None] if single else ranked)[:, :k].astype(np.int64)
    met = np.asarray(member, dtype=bool)[top].sum(1) >= math.ceil(share * k - 1e-9)
    return bool(met[0]) if single else met


def miscalibration(ranked, history_ptr, history_items, item_groups: np.ndarray, k: int,
                   alpha: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Steck's C_KL@K per user: KL(p ‖ q̃) between the history's and the top K's distributions over
    the groups (an item's mass split evenly over its groups; q̃ = (1-α) q + α p). Returns (values [U],
    defined [U]): undefined (0, False) for a user whose history holds no grouped item."""
    from mhr.ranking.objectives import (
        history_distribution,
        item_distribution,
        kl_calibration,
        list_distribution,
    )

    dist = item_distribution(item_groups)
    p = history_distribution(history_ptr, history_items, dist)
    q = list_distribution(np.asarray(ranked), dist, k)
    defined = p.sum(1) > 0
    return np.where(defined, kl_calibration(p, q, alpha), 0.0), defined


def category_coverage(ranked, item_groups: np.ndarray, k: int) -> np.ndarray | float:
    """The share of the prior's groups present among each user's top K."""
    ranked = np.asarray(ranked)
    single = ranked.ndim == 1
    top = (ranked[None] if single else ranked)[:, :k].astype(np.int64)
    groups = np.asarray(item_groups, dtype=bool)
    present = groups[:, top].any(axis=2).T  # [U, G]
    return _out(present.mean(1) if groups.shape[0] else np.zeros(len(top)), single)
