"""Ranking under decoding-time objectives (`mhr.ranking.objectives`), the one path `mhr eval`,
`mhr recommend` (one user, `--all`) and `mhr.Recommender` take, and the interest profile.

`rank_objectives` = `mhr.ranking.inference.rank_split` plus:

- **boost** on a prior the run has heads for: β joins the per-head offset of the heads whose group in
  that prior is GROUP (`t_k = a_k s_k + b_k + β`, before fusion; for router fusion on top of the
  router's offsets). On any other prior (a plain backbone, a baseline's interests, a prior the heads do
  not use): β is added to the group's items' fused scores. That ranking is computed exactly: the
  items fall into classes by their total bonus, each class is ranked alone (`allowed_items`) and the
  classes' top lists merged.
- **steer**: the candidates are the top K plus, per steered group, the top K inside the group — enough
  for the exact single-quota list (`objectives.quota_rerank`), which then re-ranks them.
- **calibrate**: the top `CALIBRATION_POOL · K` (at most the catalogue) are re-ranked by Steck's greedy
  (`objectives.calibrated_rerank`) on their probabilities: the softmax of the fused scores over
  those candidates (for router runs the fused score is already log p(k | h) p(i | k, h)).

`interest_profile`: p(group | history) per item prior — the mass of the softmax of the fused scores over
the catalogue (history excluded when it is excluded from the ranking), split over an item's groups
as `objectives.item_distribution` splits it; for a router run and a prior of its heads, the router's
p(k | h) summed over the heads of each group (the global head's mass belongs to no group).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from mhr.errors import NotFoundError, UsageError
from mhr.priors.kinds import ITEM_KINDS
from mhr.priors.spec import PriorSpec
from mhr.ranking.fusion import fuse_dense, head_log_normalisers, router_offsets
from mhr.ranking.inference import Ranking, history_mask, iter_queries, rank_split
from mhr.ranking.objectives import (
    CALIBRATION_POOL,
    Objectives,
    calibrated_rerank,
    group_mass,
    history_distribution,
    item_distribution,
    quota_rerank,
    resolve_group,
)
from mhr.training.runs import LoadedRun
from mhr.workspace import Dataset

_DENSE_ELEMENTS = 1 << 24  # profile: users per pass × heads × catalogue


@dataclass(frozen=True)
class Resolved:
    """Objectives resolved against a run and its store: what `rank_objectives` needs."""

    objectives: Objectives
    steer_members: np.ndarray  # bool [J, N+1]: the items of each steered group
    steer_shares: tuple[float, ...]
    item_bonus: np.ndarray | None  # float [N+1]: Σ β of the item-level boosts (None: none)
    head_boost: np.ndarray | None  # float [K]: Σ β of the head-level boosts (None: none)
    calibrate: PriorSpec | None

    @property
    def steer_names(self) -> tuple[str, ...]:
        return tuple(s.text() for s in self.objectives.steer)


NONE = Objectives()


def item_prior(run: LoadedRun, dataset: Dataset, name: str, flag: str) -> PriorSpec:
    """The item-kind prior `name`: the run's own (synthetic ones included), else the store's."""
    from mhr.priors.spec import load_prior
    from mhr.store import connect

    for spec in run.priors:
        if spec.name == name and spec.kind in ITEM_KINDS:
            return spec
    con = connect(dataset.store_path, read_only=True)
    try:
        try:
            spec = load_prior(con, name)
        except NotFoundError as e:
            raise UsageError(f"{flag}: {e.args[0]}", hint="name an item or graph prior from `mhr priors list`") from None
    finally:
        con.close()
    if spec.kind not in ITEM_KINDS:
        raise UsageError(f"{flag}: prior {name!r} is a {spec.kind} prior; objectives need an item or graph prior",
                         hint="name an item or graph prior from `mhr priors list`")
    return spec


def _head_level(run: LoadedRun, name: str) -> int | None:
    """The index of prior `name` among the run's head priors (None: the run has no heads over it)."""
    for level, spec in enumerate(run.layout.priors):
        if spec.name == name and run.layout.leaves:
            return level
    return None


def resolve(objectives: Objectives, run: LoadedRun, dataset: Dataset) -> Resolved:
    """Look every named prior and group up (UsageError naming the flag when one is unknown)."""
    objectives.check()
    n_cols = int(run.compat.omega.shape[1])
    members, shares = [], []
    for s in objectives.steer:
        spec = item_prior(run, dataset, s.prior, "--steer")
        g = resolve_group(s.group, spec.group_names, s.prior, "--steer")
        members.append(spec.item_groups[g, :n_cols])
        shares.append(s.share)
    item_bonus = head_boost = None
    for b in objectives.boost:
        spec = item_prior(run, dataset, b.prior, "--boost")
        g = resolve_group(b.group, spec.group_names, b.prior, "--boost")
        level = _head_level(run, b.prior)
        if level is None:
            item_bonus = np.zeros(n_cols) if item_bonus is None else item_bonus
            item_bonus = item_bonus + b.beta * spec.item_groups[g, :n_cols]
        else:
            head_boost = np.zeros(run.layout.n_heads) if head_boost is None else head_boost
            for k, leaf in enumerate(run.layout.leaves):
                if (level, g) in leaf:
                    head_boost[k] += b.beta
    cal = item_prior(run, dataset, objectives.calibrate, "--calibrate") if objectives.calibrate else None
    steer = np.array(members, dtype=bool).reshape(len(members), n_cols)
    return Resolved(objectives, steer, tuple(shares), item_bonus, head_boost, cal)


def with_head_boost(scoring: dict[str, Any], head_boost: np.ndarray | None) -> dict[str, Any]:
    """`scoring` (rank_split / grouped_fused_topk keyword arguments) with β joining the per-head offset."""
    if head_boost is None:
        return scoring
    boost = torch.as_tensor(head_boost, dtype=torch.float32)
    if scoring.get("fusion") == "router":
        return {**scoring, "head_boost": boost}
    offset = scoring.get("offset")
    return {**scoring, "offset": boost if offset is None else torch.as_tensor(offset, dtype=torch.float32) + boost}


AllowedFn = Callable[[np.ndarray], torch.Tensor]


def _within(allowed: AllowedFn | None, mask: np.ndarray) -> AllowedFn:
    m = torch.from_numpy(np.asarray(mask, dtype=bool))

    def inside(rows: np.ndarray) -> torch.Tensor:
        out = m.unsqueeze(0).expand(len(rows), -1)
        return out if allowed is None else allowed(rows).cpu() & out

    return inside


def merge_rankings(parts: list[Ranking], k: int) -> Ranking:
    """The top `k` by score of the union of `parts` (each [U, m_j]), an item kept once."""
    items = np.concatenate([p.items for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1).astype(np.float32)
    winners = np.concatenate([p.winners for p in parts], axis=1)
    by_item = np.argsort(items, axis=1, kind="stable")
    sorted_items = np.take_along_axis(items, by_item, 1)
    dup = np.zeros_like(items, dtype=bool)
    dup_sorted = np.zeros_like(dup)
    dup_sorted[:, 1:] = (sorted_items[:, 1:] == sorted_items[:, :-1]) & (sorted_items[:, 1:] > 0)
    np.put_along_axis(dup, by_item, dup_sorted, 1)
    scores = np.where(dup | (items <= 0), np.float32("-inf"), scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    out_items, out_scores = take(items), take(scores)
    empty = ~np.isfinite(out_scores)
    return Ranking(np.where(empty, 0, out_items), out_scores, np.where(empty, -1, take(winners)))


def _take(r: Ranking, pos: np.ndarray) -> Ranking:
    take = lambda a: np.take_along_axis(a, pos, 1)  # noqa: E731
    return Ranking(take(r.items), take(r.scores), take(r.winners))


def rank_objectives(run: LoadedRun, split: dict[str, np.ndarray], k: int, scoring: dict[str, Any],
                    resolved: Resolved | None, *, exclude_history: bool = True, batch_size: int = 256,
                    device: str | torch.device = "cpu", user_heads: torch.Tensor | None = None,
                    allowed_items: AllowedFn | None = None, cutoffs: Sequence[int] | None = None) -> Ranking:
    """Top `k` per user of the split under the objectives (`None`: exactly `rank_split`). `scoring`:
    rank_split's fusion keyword arguments (`mhr.ranking.fusion.scoring_args`); `cutoffs`: the list
    lengths a `--steer` quota holds at (default: k; `mhr eval` gives its --k cut-offs)."""
    kw = scoring if resolved is None else with_head_boost(scoring, resolved.head_boost)
    n_items = int(run.compat.omega.shape[1] - 1)

    def fetch(m: int, within: np.ndarray | None = None) -> Ranking:
        bonus = None if resolved is None else resolved.item_bonus
        allowed = allowed_items if within is None else _within(allowed_items, within)
        if bonus is None or not bonus[1:].any():
            return rank_split(run.model, run.compat, split, m, exclude_history=exclude_history,
                              batch_size=batch_size, device=device, user_heads=user_heads,
                              allowed_items=allowed, **kw)
        parts = []
        for value in np.unique(bonus[1:]):
            part = fetch_class(m, _within(allowed, bonus == value))
            parts.append(replace(part, scores=part.scores + np.float32(value)))
        return merge_rankings(parts, m)

    def fetch_class(m: int, allowed: AllowedFn) -> Ranking:
        return rank_split(run.model, run.compat, split, m, exclude_history=exclude_history,
                          batch_size=batch_size, device=device, user_heads=user_heads,
                          allowed_items=allowed, **kw)

    if resolved is None or not resolved.objectives.reranks:
        return fetch(k)
    if resolved.objectives.steer:
        parts = [fetch(k)] + [fetch(k, g) for g in resolved.steer_members]
        cands = merge_rankings(parts, sum(p.items.shape[1] for p in parts))
        return _take(cands, quota_rerank(cands.items, cands.scores, resolved.steer_members,
                                         resolved.steer_shares, k, cutoffs))
    cands = fetch(max(k, min(n_items, CALIBRATION_POOL * k)))
    dist = item_distribution(resolved.calibrate.item_groups[:, : n_items + 1])
    p = history_distribution(split["history_ptr"], split["history_items"], dist)
    pos = calibrated_rerank(cands.items, candidate_probabilities(cands.scores), dist, p, k,
                            resolved.objectives.calibrate_lambda)
    return _take(cands, pos)


def candidate_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax [U, M] of fused scores over each user's candidates (-inf: probability 0)."""
    s = torch.from_numpy(np.asarray(scores, dtype=np.float64))
    finite = torch.isfinite(s)
    p = torch.softmax(s.masked_fill(~finite, float("-inf")), dim=1)
    return torch.nan_to_num(p, nan=0.0).numpy()


# ---------------------------------------------------------------------------------------------
# interest profile


@torch.no_grad()
def fused_probabilities(run: LoadedRun, split: dict[str, np.ndarray], scoring: dict[str, Any],
                        exclude_history: bool = True, batch_size: int | None = None
                        ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
    """Per batch of users: yields (rows, softmax over the catalogue of the fused scores [b, N+1] — the
    dense formula `fuse_dense`, every head scoring every item —, the router's log p(k | h) or None)."""
    model, omega = run.model, run.compat.omega
    device = omega.device
    vecs = model.item_vectors().float()
    n_heads, n_cols = omega.shape
    elig = omega.clone()
    elig[:, 0] = False
    routed = scoring.get("fusion") == "router"
    fusion = "max" if routed else scoring.get("fusion", "max")
    params = {n: scoring.get(n) for n in ("weights", "scale", "offset")}
    b = batch_size or max(1, _DENSE_ELEMENTS // max(1, n_heads * n_cols))
    for rows, q, heads, log_p in iter_queries(model, run.compat, split, batch_size=b, device=device, route=True):
        s = model.scorer(q, vecs).float()  # [b, K, N+1]
        allowed = elig.unsqueeze(0) & heads.unsqueeze(-1)
        if routed:
            params["offset"] = router_offsets(log_p, head_log_normalisers(q, vecs, model.scorer, omega))
        fused, _ = fuse_dense(s, allowed, fusion, **params)
        if exclude_history:
            fused = fused.masked_fill(history_mask(split, rows, n_cols - 1).to(device), float("-inf"))
        fused[:, 0] = float("-inf")
        yield rows, torch.nan_to_num(torch.softmax(fused, dim=1), nan=0.0), log_p


def interest_profile(run: LoadedRun, split: dict[str, np.ndarray], scoring: dict[str, Any],
                     specs: list[PriorSpec], exclude_history: bool = True) -> dict[str, np.ndarray]:
    """p(group | history) [U, G] per prior of `specs` (module doc); rows sum to the mass of the grouped
    items (1 for a partition prior)."""
    n_cols = int(run.compat.omega.shape[1])
    n_users = len(split["user"])
    out = {s.name: np.zeros((n_users, s.n_groups)) for s in specs}
    dists = {s.name: torch.from_numpy(item_distribution(s.item_groups[:, :n_cols])) for s in specs}
    routed_levels = {s.name: _head_level(run, s.name) for s in specs} if run.model.router is not None else {}
    for rows, probs, log_p in fused_probabilities(run, split, scoring, exclude_history):
        for s in specs:
            level = routed_levels.get(s.name)
            if level is not None and log_p is not None:
                out[s.name][rows] = _route_mass(run, log_p.exp().double().cpu(), level, s.n_groups)
            else:
                out[s.name][rows] = group_mass(probs.cpu(), dists[s.name]).numpy()
    return out


def _route_mass(run: LoadedRun, p_heads: torch.Tensor, level: int, n_groups: int) -> np.ndarray:
    """Σ p(k | h) over the heads whose group at `level` is g, [b, G]."""
    to_group = torch.zeros(p_heads.shape[1], n_groups, dtype=torch.float64)
    for k, leaf in enumerate(run.layout.leaves):
        for lv, g in leaf:
            if lv == level:
                to_group[k, g] = 1.0
    return (p_heads @ to_group).numpy()


def profile_priors(run: LoadedRun, dataset: Dataset, names: list[str] | None = None) -> list[PriorSpec]:
    """The priors a profile covers: `names`, else the run's item-kind priors, else every item or
    graph prior in the store."""
    if names:
        return [item_prior(run, dataset, n, "--profile") for n in names]
    own = [s for s in run.priors if s.kind in ITEM_KINDS]
    if own:
        return own
    from mhr.priors.spec import load_prior
    from mhr.store import connect

    con = connect(dataset.store_path, read_only=True)
    try:
        rows = con.execute("SELECT prior, kind FROM priors ORDER BY prior").fetchall()
        return [load_prior(con, r[0]) for r in rows if r[1] in ITEM_KINDS]
    finally:
        con.close()
