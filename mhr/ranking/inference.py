"""Ranking a split of users: the last position's head queries, fused over eligible heads.

Shared by validation during training and by `mhr eval` / `mhr recommend`, so both rank exactly
the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mhr.errors import UsageError
from mhr.models.heads import Compatibility
from mhr.models.multihead import MultiHeadRecommender
from mhr.ranking.fusion import head_items, head_log_normalisers, router_offsets
from mhr.ranking.scoring import grouped_fused_topk


@dataclass(frozen=True)
class Ranking:
    """Top-k per user: item ids, fused scores and the head that won each item (-1 under avg)."""

    items: np.ndarray  # [U, k] int64
    scores: np.ndarray  # [U, k] float32
    winners: np.ndarray  # [U, k] int64


def history_mask(split: dict[str, np.ndarray], rows: np.ndarray, n_items: int) -> torch.Tensor:
    """Bool [len(rows), n_items + 1]: True where the item is in the user's history."""
    mask = np.zeros((len(rows), n_items + 1), dtype=bool)
    ptr, hist = split["history_ptr"], split["history_items"]
    for i, r in enumerate(rows):
        mask[i, hist[ptr[r] : ptr[r + 1]]] = True
    return torch.from_numpy(mask)


def history_rows(split: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The users' histories as CSR (indptr [len(rows)+1], item ids): what `history_mask` marks,
    without a [len(rows), N+1] mask — the scorers take either."""
    ptr, hist = split["history_ptr"], split["history_items"]
    lengths = ptr[rows + 1] - ptr[rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([hist[ptr[r] : ptr[r + 1]] for r in rows]) if len(rows) else hist[:0]
    return indptr, items


@torch.no_grad()
def iter_queries(
    model: MultiHeadRecommender,
    compat: Compatibility,
    split: dict[str, np.ndarray],
    rows: np.ndarray | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    route: bool = False,
) -> Iterator[tuple]:
    """(row indices, head queries q [b, K, d] float32, usable heads [b, K] bool) per batch of the
    split's users (`rows`: a subset, default all), the model in eval mode meanwhile; with `route`,
    a fourth element: the router's log p(k | h) [b, K] (None for a run without a router)."""
    was_training = model.training
    model.eval()
    try:
        rows = np.arange(len(split["user"])) if rows is None else np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), batch_size):
            r = rows[start : start + batch_size]
            items = torch.from_numpy(split["items"][r]).to(device)
            ts = torch.from_numpy(split["ts"][r]).to(device)
            length = torch.from_numpy(split["length"][r]).to(device)
            users = torch.from_numpy(split["user"][r]).to(device)
            q, log_p = model.last_decode(items, ts, length)
            if route:
                yield r, q.float(), compat.users(users), log_p
            else:
                yield r, q.float(), compat.users(users)
    finally:
        model.train(was_training)


@torch.no_grad()
def rank_split(
    model: MultiHeadRecommender,
    compat: Compatibility,
    split: dict[str, np.ndarray],
    k: int,
    fusion: str = "max",
    exclude_history: bool = True,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    eligible: torch.Tensor | None = None,
    user_heads: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    allowed_items=None,
    head_boost: torch.Tensor | None = None,
) -> Ranking:
    """Rank the full catalogue for every user of a valid/test split (history excluded by default).

    `eligible` overrides the heads' candidate sets (default Ω_k); `user_heads` [U, K] further
    restricts which heads each user may use (the labelled event oracle). `weights` / `scale` /
    `offset` [K]: per-head fusion parameters (`mhr.ranking.fusion`; a fitted fusion's `scoring_kwargs()`).
    `fusion="router"`: max fusion of log p(k | h) + log p(i | k, h) with the run's joint router.
    `allowed_items(rows) -> bool [b, N+1]`: items each user may be recommended (the labelled
    group oracle); everything else is excluded like history. `head_boost` [K]: added to the router's
    per-user offsets (router fusion; for the others it is part of `offset`, `mhr.ranking.decode`).
    """
    routed = fusion == "router"
    if routed:
        if model.router is None:
            raise UsageError("--fusion router needs a run trained with --router",
                             hint="retrain with `mhr train --router …`, or use --fusion max")
        if offset is not None or scale is not None or weights is not None:
            raise ValueError("router fusion sets its own per-user offsets")
        fusion = "max"
    elif head_boost is not None:
        raise ValueError("head_boost goes with router fusion; for the others add it to `offset`")
    was_training = model.training
    model.eval()
    item_vecs = model.item_vectors().float()
    n_items = item_vecs.shape[0] - 1
    k = max(1, min(k, n_items))  # a user's size: the ranking holds at most the catalogue
    omega = (compat.omega if eligible is None else eligible).to(device)
    out_items, out_scores, out_winners = [], [], []
    members = head_items(omega) if routed else None
    for rows, q, heads, log_p in iter_queries(model, compat, split, batch_size=batch_size, device=device,
                                              route=True):
        if user_heads is not None:
            heads = heads & user_heads[rows].to(device)
        if routed:
            offset = router_offsets(log_p, head_log_normalisers(q, item_vecs, model.scorer, omega, members))
            if head_boost is not None:
                offset = offset + head_boost.to(offset.device)
        exclude = None
        if allowed_items is not None:
            exclude = ~allowed_items(rows).to(device)
            if exclude_history:
                exclude |= history_mask(split, rows, n_items).to(device)
        elif exclude_history:
            exclude = history_rows(split, rows)
        top_items, top_scores, top_winners = grouped_fused_topk(
            q, item_vecs, model.scorer, omega, heads, exclude, k, fusion,
            weights=weights, scale=scale, offset=offset,
        )
        out_items.append(top_items.cpu().numpy())
        out_scores.append(top_scores.cpu().numpy())
        out_winners.append(top_winners.cpu().numpy())
    model.train(was_training)
    if not out_items:
        empty = np.zeros((0, k))
        return Ranking(empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.int64))
    return Ranking(
        np.concatenate(out_items).astype(np.int64),
        np.concatenate(out_scores).astype(np.float32),
        np.concatenate(out_winners).astype(np.int64),
    )
