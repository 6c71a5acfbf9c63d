"""Objectives at decoding time: steer, boost and calibrate any run over the groups of an item prior,
and the user's interest profile over them. Pure functions of ranked candidates; the model-facing
glue (which candidates to fetch, per-head boosts) is `mhr.ranking.decode`.

- **steer** `PRIOR:GROUP=SHARE` — a lower-bound quota: every list of K holds at least
  `ceil(SHARE · K)` items of GROUP where the user's candidates allow (`quota_rerank`).
- **boost** `PRIOR:GROUP=β` — β added to the group's items' scores (a plain backbone, or a prior the
  run has no heads for), or to the scores of the heads whose group in PRIOR is GROUP, before fusion
  (a head run over PRIOR: the per-head offset of `mhr.ranking.fusion.calibrate`).
- **calibrate** `PRIOR`, λ — Steck's greedy calibrated re-ranking (Steck, "Calibrated
  recommendations", RecSys 2018): the list maximising `(1-λ) Σ_{i∈S} s(i) - λ KL(p ‖ q̃(S))`
  (`calibrated_rerank`).

Group distributions follow Steck's p(g | i): an item's mass 1 is split evenly over its groups
(multi-label), an item without a group carries none (`item_distribution`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mhr.errors import UsageError

if TYPE_CHECKING:
    import torch

CALIBRATION_ALPHA = 0.01  # Steck's smoothing q̃ = (1-α) q + α p
CALIBRATION_POOL = 10  # calibrated re-ranking picks K of the model's top CALIBRATION_POOL · K items
_EPS = 1e-9


@dataclass(frozen=True)
class Steer:
    prior: str
    group: str
    share: float

    def text(self) -> str:
        return f"{self.prior}:{self.group}={self.share:g}"


@dataclass(frozen=True)
class Boost:
    prior: str
    group: str
    beta: float

    def text(self) -> str:
        return f"{self.prior}:{self.group}={self.beta:g}"


@dataclass(frozen=True)
class Objectives:
    steer: tuple[Steer, ...] = ()
    boost: tuple[Boost, ...] = ()
    calibrate: str | None = None
    calibrate_lambda: float = 0.5

    @property
    def active(self) -> bool:
        return bool(self.steer or self.boost or self.calibrate)

    @property
    def reranks(self) -> bool:
        """Whether a re-ranking of the fused list runs (steer or calibrate; a boost only shifts scores)."""
        return bool(self.steer or self.calibrate)

    def check(self) -> None:
        if self.steer and self.calibrate:
            raise UsageError("--steer and --calibrate are two re-rankings of one list", hint="use one of them "
                             "(--boost combines with either)")
        lam = self.calibrate_lambda
        if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
            raise UsageError(f"--calibrate-lambda {lam} is outside [0, 1]", hint="0 = the plain ranking, "
                             "1 = calibration alone; Steck used 0..0.99")


_SPEC = re.compile(r"^(?P<prior>[^:=]+):(?P<group>.+)=(?P<value>[^=]+)$")


def _split(text: str, flag: str, what: str) -> tuple[str, str, float]:
    m = _SPEC.match(str(text).strip())
    if m is None:
        raise UsageError(f"{flag} {text!r} is not PRIOR:GROUP={what}", hint=f"e.g. {flag} \"genre6:Children's=0.2\"")
    try:
        value = float(m["value"])
    except ValueError:
        raise UsageError(f"{flag} {text!r}: {m['value']!r} is not a number", hint=f"PRIOR:GROUP={what}") from None
    if not math.isfinite(value):
        raise UsageError(f"{flag} {text!r}: {what} must be a finite number", hint=f"PRIOR:GROUP={what}")
    return m["prior"].strip(), m["group"].strip(), value


def parse_steer(text: str, flag: str = "--steer") -> Steer:
    """`PRIOR:GROUP=SHARE`, SHARE in [0, 1] (the group's minimum share of every list)."""
    prior, group, share = _split(text, flag, "SHARE")
    if not 0.0 <= share <= 1.0:
        raise UsageError(f"{flag} {text!r}: SHARE {share:g} is outside [0, 1]", hint="a share of the list, e.g. 0.2")
    return Steer(prior, group, share)


def parse_boost(text: str, flag: str = "--boost") -> Boost:
    """`PRIOR:GROUP=β`, β any finite number (added to scores; negative demotes)."""
    prior, group, beta = _split(text, flag, "BETA")
    return Boost(prior, group, beta)


def objectives_from_texts(steer: Sequence[str] = (), boost: Sequence[str] = (), calibrate: str | None = None,
                         calibrate_lambda: float = 0.5, *, flags: tuple[str, str] = ("--steer", "--boost")
                         ) -> Objectives:
    """The objectives as a command line, a recipe or a request gives them (`PRIOR:GROUP=…` texts);
    `flags`: how the steer and boost texts are named in an error. Not checked (`Objectives.check`)."""
    return Objectives(tuple(parse_steer(t, flags[0]) for t in steer), tuple(parse_boost(t, flags[1]) for t in boost),
                      calibrate or None, float(calibrate_lambda))


def resolve_group(group: str, names: tuple[str, ...], prior: str, flag: str) -> int:
    """A group of `prior` by name (as `mhr priors show` lists it) or by id."""
    if group in names:
        return names.index(group)
    if group.isdigit() and int(group) < len(names):
        return int(group)
    shown = ", ".join(names[:8]) + (" …" if len(names) > 8 else "")
    raise UsageError(f"{flag}: prior {prior!r} has no group {group!r} (groups: {shown})",
                     hint=f"name a group or its id as `mhr priors show {prior}` lists them")


# ---------------------------------------------------------------------------------------------
# group distributions


def item_distribution(item_groups: np.ndarray) -> np.ndarray:
    """p(g | i) float [N+1, G] from bool [G, N+1]: an item's mass split evenly over its groups; rows of
    ungrouped items (and padding 0) are 0."""
    groups = np.asarray(item_groups, dtype=bool)
    per_item = groups.sum(0)
    dist = np.where(per_item > 0, groups / np.maximum(per_item, 1), 0.0).T.astype(np.float64)
    dist[0] = 0.0
    return dist


def history_distribution(history_ptr: np.ndarray, history_items: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Steck's p(g | u) [U, G]: the mean of p(g | i) over the user's history (every interaction counts
    once), normalised over the grouped items; a user without a grouped item gets a row of zeros."""
    ptr = np.asarray(history_ptr, dtype=np.int64)
    per = dist[np.asarray(history_items, dtype=np.int64)]
    csum = np.concatenate([np.zeros((1, dist.shape[1])), np.cumsum(per, axis=0)])
    mass = csum[ptr[1:]] - csum[ptr[:-1]]
    mass[ptr[1:] == ptr[:-1]] = 0.0
    total = mass.sum(1, keepdims=True)
    return mass / np.where(total > 0, total, 1.0)


def list_distribution(items: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """q(g | list) [U, G] of the top `k` of `items` [U, M] (padding 0 carries no mass), normalised;
    a list without a grouped item gets zeros."""
    mass = dist[np.asarray(items, dtype=np.int64)[:, :k]].sum(1)
    total = mass.sum(1, keepdims=True)
    return mass / np.where(total > 0, total, 1.0)


def kl_calibration(p: np.ndarray, q: np.ndarray, alpha: float = CALIBRATION_ALPHA) -> np.ndarray:
    """Steck's miscalibration KL(p ‖ q̃) = Σ_g p_g log(p_g / q̃_g), q̃ = (1-α) q + α p, per row [U]."""
    q_t = (1 - alpha) * q + alpha * p
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q_t), 0.0)
    return terms.sum(1)


# ---------------------------------------------------------------------------------------------
# re-rankings: positions into each row of sorted candidates


def quota_rerank(items: np.ndarray, scores: np.ndarray, members: np.ndarray, shares, k: int,
                 cutoffs: Sequence[int] | None = None) -> np.ndarray:
    """Positions [U, k] into `items`/`scores` [U, M] (each row sorted by score, best first; -inf = no
    candidate) of lists meeting lower-bound quotas: `members` bool [J, N+1] (item in steered group j),
    `shares` [J]; the top K of the list should hold ≥ ceil(share_j · K) items of group j at every
    cut-off K of `cutoffs` (default: the list's length k; `mhr eval` passes its --k cut-offs).

    The greedy fills position n = 1..k: a quota is short at n when the items of group j it still owes
    at some cut-off K ≥ n fill every position left up to K (count_j < ceil(share_j·K) − (K − n)); then
    it takes the best remaining candidate among those that count for the most short quotas, otherwise
    the best remaining one. So group items are forced in as late as the cut-offs allow.

    One quota (J = 1) — exact at every cut-off. Let G be the group, g_1 ≥ g_2 ≥ … its candidates'
    scores and o_1 ≥ o_2 ≥ … the others'. A best K-list under "≥ q items of G" holds the top m of G
    and the top K−m others for some m ≥ q (swapping in a better item of the same kind never hurts),
    and its score F(m) = Σ_{a≤m} g_a + Σ_{b≤K−m} o_b is concave in m (F(m+1) − F(m) = g_{m+1} − o_{K−m}
    decreases), so the best m is max(q, m₀) with m₀ the G-count of the plain top K: take the top K;
    if short of q, swap the lowest-scored non-G items for the best G items not in it. The greedy's top K
    has exactly that form: until forced it takes the best remaining items (the plain top K − d), then
    the d best G items left, d the deficit — and the forced items score below every item before them,
    so with one cut-off the list stays in score order (the best order for any decreasing position
    weights, e.g. DCG). Nested cut-offs: each top K is again the optimum under its own quota (tested
    against brute force); an item forced in for a smaller K may then sit above better items after it. When G runs out, the rest are the best others.

    Several quotas: the same greedy, preferring the candidate that counts for most short quotas
    (ties: the better score). Not optimal in general (overlapping or infeasible quotas make the
    problem a covering problem); quotas whose shares add up to more than the list can hold are met
    in the order the greedy meets them."""
    n_users, m = items.shape
    k = min(k, m)
    members = np.asarray(members, dtype=bool)
    need_share = np.asarray(shares, dtype=np.float64)
    out = np.zeros((n_users, k), dtype=np.int64)
    if n_users == 0:
        return out
    cand_in = np.stack([members[j][items] for j in range(len(members))], axis=-1)  # [U, M, J]
    valid = np.isfinite(scores) & (items > 0)
    taken = np.zeros((n_users, m), dtype=bool)
    count = np.zeros((n_users, len(members)), dtype=np.int64)
    rows = np.arange(n_users)
    cuts = np.array(sorted({min(int(c), k) for c in (cutoffs or (k,)) if c >= 1}), dtype=np.int64)
    owed = np.ceil(need_share[:, None] * cuts[None, :] - _EPS).astype(np.int64)  # [J, C] at each cut-off
    have = (cand_in & valid[:, :, None]).sum(1)  # [U, J]: a quota owes at most the group's candidates
    owed = np.minimum(owed[None], have[:, :, None])  # [U, J, C]
    for n in range(1, k + 1):
        ahead = cuts >= n
        need = (owed[:, :, ahead] - (cuts[ahead] - n)).max(2, initial=0)  # [U, J]
        short = count < need  # [U, J]
        cover = (cand_in & short[:, None, :]).sum(-1)  # [U, M]
        key = np.where(valid & ~taken, cover, -1)
        pick = key.argmax(1)  # first max: the best-scored candidate with the most short quotas
        none = key[rows, pick] < 0  # nothing left: fill with the first untaken slot (an empty one)
        if none.any():
            pick[none] = (~taken[none]).argmax(1)
        taken[rows, pick] = True
        count += cand_in[rows, pick]
        out[:, n - 1] = pick
    return out


def calibrated_rerank(items: np.ndarray, probs: np.ndarray, dist: np.ndarray, p: np.ndarray, k: int,
                      lam: float, alpha: float = CALIBRATION_ALPHA, chunk: int | None = None) -> np.ndarray:
    """Steck's greedy calibrated re-ranking: positions [U, k] into `items` [U, M] (sorted best first;
    `probs` [U, M] the model's probabilities s(i), 0 for no candidate), adding at each step the
    candidate i maximising `(1-λ) Σ_{j ∈ S∪i} s(j) − λ KL(p ‖ q̃(S∪i))`, with q(S) the list's group
    distribution (`dist` p(g | i) [N+1, G], uniform over the list's items) and `p` [U, G] the user's
    history distribution. Ties: the better-ranked candidate. A user with no grouped history (p = 0)
    keeps the plain ranking (KL is 0 for every list)."""
    import torch

    n_users, m = items.shape
    k = min(k, m)
    # the KL of S ∪ {i} depends on i only through p(· | i): computed once per distinct row ("pattern")
    patterns_np, pattern_of = np.unique(np.asarray(dist, dtype=np.float64), axis=0, return_inverse=True)
    patterns = torch.from_numpy(patterns_np)  # [P, G]
    pattern_of = torch.from_numpy(pattern_of.reshape(-1).astype(np.int64))  # [N+1]
    chunk = chunk or max(1, (1 << 21) // max(1, len(patterns) * dist.shape[1] + m))  # bounds [u, P, G] buffers
    out = np.zeros((n_users, k), dtype=np.int64)
    for a in range(0, n_users, chunk):
        it = torch.from_numpy(np.array(items[a : a + chunk], dtype=np.int64))
        s = torch.from_numpy(np.array(probs[a : a + chunk], dtype=np.float64))
        pu = torch.from_numpy(np.array(p[a : a + chunk], dtype=np.float64)).unsqueeze(1)  # [u, 1, G]
        pat = pattern_of[it]  # [u, M]
        valid = (it > 0) & torch.isfinite(s)
        s = torch.where(valid, s, 0.0)
        mass = torch.zeros(len(it), 1, patterns.shape[1], dtype=torch.float64)  # Σ_{j∈S} p(g | j)
        gained = torch.zeros(len(it), 1, dtype=torch.float64)  # Σ_{j∈S} s(j)
        taken = ~valid
        rows = torch.arange(len(it))
        log_p = torch.where(pu > 0, pu.log(), 0.0)
        for step in range(k):
            new_mass = mass + patterns.unsqueeze(0)  # [u, P, G]
            new_total = new_mass.sum(-1, keepdim=True)
            q_t = (1 - alpha) * new_mass / torch.where(new_total > 0, new_total, 1.0) + alpha * pu
            kl = torch.where(pu > 0, pu * (log_p - q_t.clamp(min=1e-300).log()), 0.0).sum(-1)  # [u, P]
            gain = (1 - lam) * (gained + s) - lam * kl.gather(1, pat)
            gain = gain.masked_fill(taken, float("-inf"))
            pick = gain.argmax(1)
            empty = torch.isinf(gain[rows, pick])  # nothing left: an untaken padding slot, or the first
            if bool(empty.any()):
                pick[empty] = (~(taken & valid))[empty].float().argmax(1)
            taken[rows, pick] = True
            mass += patterns[pat[rows, pick]].unsqueeze(1) * (~empty).unsqueeze(-1).unsqueeze(-1)
            gained += (s[rows, pick] * ~empty).unsqueeze(1)
            out[a : a + len(it), step] = pick.numpy()
    return out


def group_mass(probs: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Interest profile [B, G]: Σ_i P(i) p(g | i) for item probabilities `probs` [B, N+1] (rows sum to
    1) and `dist` [N+1, G] — for a partition prior, the probability mass of each group, summing to 1."""
    return probs.double() @ dist.double()
