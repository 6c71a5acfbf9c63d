"""Fusion of head scores: the paper's max / avg (`fuse_max`, `fuse_avg`) and, beyond them, `learned`
(per-head calibration fitted on the validation split) and `invvar` (inverse-variance weighting) —
pure functions, no files.

Every fusion is one formula over the heads `E_u(i) = H(i) ∩ {heads user u may use}` of an item,
applied to per-head *calibrated* scores `t_k = a_k · s_k + b_k`:

    max:      fused(i) = max_{k ∈ E(i)} t_k(i)                 (winner = argmax, lowest head on ties)
    avg:      fused(i) = Σ_{k ∈ E(i)} w_k t_k(i) / Σ_{k ∈ E(i)} w_k

`a` (scale), `b` (offset) and `w` (weights) are per head, `[K]` or per user `[B, K]`; left out they
are 1, 0, 1, which is the paper's max / avg. `fuse_dense` is the dense reference of this formula;
`mhr.ranking.scoring.grouped_fused_topk(..., weights=, scale=, offset=)` is the fast path that agrees with it.

The two fitted fusions are settings of that formula:

- **learned** = avg of calibrated heads, `w = 1`, `a_k = exp(α_k) > 0`, `b_k` free: each head gets
  its own temperature and offset (temperature scaling / Platt calibration per head, which keeps the
  ranking *inside* a head unchanged), and the calibrated scores are averaged over the eligible
  heads. Why calibration and not a normalised weighted mean Σ w_k s_k / Σ w_k: with single-label
  category heads every item has one eligible head, so a normalised weight cancels out and could
  never fix what goes wrong across groups (heads trained on in-group negatives are not comparable
  across groups: docs/ARCHITECTURE.md, "What to watch"); an offset and a scale per head can. Where every head
  is eligible for every item (temporal, event heads) it is a weighted sum Σ a_k s_k / K + const.
  Fitted by minimising the full-catalogue softmax cross-entropy of the validation targets (history
  excluded, as in evaluation) over the 2K parameters, everything else frozen, with full-batch
  L-BFGS on cached per-user head scores (a deterministic subsample of users when the cache would
  exceed a memory budget) and a weak L2 pull of the per-head deviations (α_k - ᾱ, b_k - b̄) towards 0
  (a common temperature or shift is free: it does not change the ranking). Deterministic: no randomness
  but the seeded subsample. The fitted parameters are then put in a canonical gauge — the fused
  ranking is invariant to a common shift of every `b_k` and to a common positive factor on all
  `(a_k, b_k)` — geometric mean of `a` = 1 and mean of `b` = 0, so one head gives `a = 1, b = 0`:
  exactly plain scoring.
- **invvar** = avg with `w_k = 1 / Var_k`, where `Var_k` is the variance of head k's scores over its
  eligible items Ω_k, averaged over the validation users allowed to use head k (estimated once on
  the validation split, not per user at test time: one weight vector per run, cached and keyed like
  `learned`). Weights are scaled so the largest is 1 (the normalised weighted mean ignores the
  scale). Heads with an undefined variance (fewer than 2 eligible items, no user) get the median
  variance of the others. Note: a normalised weighted mean leaves items with a single eligible
  head as they are; invvar changes only how items scored by several heads are combined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mhr.models.heads import ScoreFn

FUSIONS = ("max", "avg", "learned", "invvar", "router")
FITTED = ("learned", "invvar")
FORMULAS = ("max", "avg")  # what `fuse_dense` and the scoring kernels compute; the rest are settings of them
NEG_INF = float("-inf")  # the fused score of an item no eligible head may score

# settings of the fitted fusions; all of them enter the fit's cache key (see `fit_settings`)
FIT_VERSION = 3
MAX_LOG_RESCALE = math.log(1e6)  # a fit needing a larger rescale to the canonical gauge is degenerate
FIT_SEED = 0
FIT_MAX_ELEMENTS = 1 << 26  # `learned`: cached scores of the fit users, ≤ 64 Mi floats (256 MiB)
FIT_CHUNK_ELEMENTS = 1 << 22  # users per loss chunk × (M + N + 1) — bounds the autograd graph
FIT_MIN_USERS = 256
FIT_MAX_ITER = 200
FIT_L2 = 1e-3
VAR_MAX_USERS = 4096


def fit_settings(kind: str) -> dict[str, Any]:
    """Everything besides the run and its validation split that decides a fitted fusion."""
    if kind == "learned":
        return {"kind": kind, "version": FIT_VERSION, "seed": FIT_SEED, "max_elements": FIT_MAX_ELEMENTS,
                "chunk_elements": FIT_CHUNK_ELEMENTS, "min_users": FIT_MIN_USERS, "max_iter": FIT_MAX_ITER,
                "l2": FIT_L2}
    if kind == "invvar":
        return {"kind": kind, "version": FIT_VERSION, "seed": FIT_SEED, "max_users": VAR_MAX_USERS}
    raise ValueError(f"{kind!r} is not a fitted fusion; fitted are {FITTED}")


# ---------------------------------------------------------------------------------------------
# the paper's max and avg, dense (`fuse_dense` adds per-head parameters; `mhr.ranking.scoring`
# holds the grouped fast path)


def _allowed(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    eligible = eligible.to(scores.device, torch.bool)
    return eligible.expand_as(scores) if eligible.dim() == 2 else eligible


def fuse_max(scores: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over each item's eligible heads. scores [B, K, N], eligible [B, K, N] or [K, N] ->
    (fused [B, N], winner [B, N]); no eligible head: -inf and winner -1; ties: lowest head id."""
    allowed = _allowed(scores, eligible)
    fused, winner = scores.masked_fill(~allowed, NEG_INF).max(dim=1)
    none = ~allowed.any(dim=1)
    return fused.masked_fill(none, NEG_INF), winner.masked_fill(none, -1)


def fuse_avg(scores: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over each item's eligible heads; same shapes as `fuse_max`, winner always -1."""
    allowed = _allowed(scores, eligible)
    count = allowed.sum(dim=1)
    fused = torch.where(allowed, scores, 0.0).sum(dim=1) / count.clamp(min=1)
    fused = fused.masked_fill(count == 0, NEG_INF)
    return fused, torch.full_like(fused, -1, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# the formula, dense


def per_head(x: torch.Tensor | np.ndarray | Iterable[float] | None, n_heads: int, device,
             name: str = "parameter", positive: bool = False) -> torch.Tensor | None:
    """A per-head parameter as float32 `[1, K]` or `[B, K]` on `device` (None stays None)."""
    if x is None:
        return None
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    t = t.to(device=device, dtype=torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != n_heads:
        raise ValueError(f"{name} must be [K] or [B, K] with K = {n_heads}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    if positive and not bool((t > 0).all()):
        raise ValueError(f"{name} must be > 0")
    return t


def calibrate(scores: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor:
    """`a_k s_k + b_k` for scores `[B, K, M]` and per-head `[1|B, K]` parameters."""
    if scale is not None:
        scores = scores * scale.unsqueeze(-1)
    if offset is not None:
        scores = scores + offset.unsqueeze(-1)
    return scores


def fuse_dense(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    fusion: str,
    weights=None,
    scale=None,
    offset=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: scores [B, K, M], allowed [B, K, M] or [K, M] (E(i) per user) ->
    (fused [B, M], winner [B, M]); no allowed head: -inf and winner -1. Winner is -1 under avg."""
    b, n_heads, _ = scores.shape
    device = scores.device
    allowed = _allowed(scores, allowed)
    if fusion == "max" and weights is not None:
        raise ValueError("weights apply to avg fusion; use scale/offset to calibrate max")
    t = calibrate(scores.float(), per_head(scale, n_heads, device, "scale", positive=True),
                  per_head(offset, n_heads, device, "offset"))
    none = ~allowed.any(dim=1)
    if fusion == "max":
        fused, winner = t.masked_fill(~allowed, NEG_INF).max(dim=1)
        return fused.masked_fill(none, NEG_INF), winner.masked_fill(none, -1)
    if fusion != "avg":
        raise ValueError(f"unknown fusion {fusion!r}; the formula has max and avg")
    w = per_head(weights, n_heads, device, "weights", positive=True)
    if w is None:
        count = allowed.sum(dim=1)
        fused = torch.where(allowed, t, 0.0).sum(dim=1) / count.clamp(min=1)
    else:
        ww = torch.where(allowed, w.unsqueeze(-1).expand_as(t), 0.0)
        total = ww.sum(dim=1)
        fused = (torch.where(allowed, t, 0.0) * ww).sum(dim=1) / torch.where(total > 0, total, 1.0)
    return fused.masked_fill(none, NEG_INF), torch.full_like(fused, -1, dtype=torch.long)


def head_contributions(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    weights=None,
    scale=None,
    offset=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's term of the avg formula, the explanation of a fused score when no head wins.

    scores [B, K, M], allowed [B, K, M] or [K, M] -> (contrib [B, K, M], top [B, M]): contrib is
    `w_k t_k / Σ_{j ∈ E(i)} w_j` for k ∈ E(i) and 0 elsewhere, so `contrib.sum(1)` is `fuse_dense(…,
    "avg", …)`'s fused score; top is the head with the largest term (lowest head on ties), -1 where
    E(i) is empty. The largest term is the head that lifts the item most: with equal weights
    (avg, learned) it is the head with the highest calibrated score t_k, which a common shift or
    positive factor of the calibration (the fit's gauge freedom) does not change.
    """
    _, n_heads, _ = scores.shape
    device = scores.device
    allowed = allowed.to(device, torch.bool)
    allowed = allowed.expand_as(scores) if allowed.dim() == 2 else allowed
    t = calibrate(scores.float(), per_head(scale, n_heads, device, "scale", positive=True),
                  per_head(offset, n_heads, device, "offset"))
    w = per_head(weights, n_heads, device, "weights", positive=True)
    ww = torch.where(allowed, 1.0 if w is None else w.unsqueeze(-1).expand_as(t), 0.0)
    total = ww.sum(dim=1, keepdim=True)
    contrib = torch.where(allowed, t * ww / torch.where(total > 0, total, 1.0), 0.0)
    top = contrib.masked_fill(~allowed, NEG_INF).argmax(dim=1)
    return contrib, top.masked_fill(~allowed.any(dim=1), -1)


# ---------------------------------------------------------------------------------------------
# fitted parameters


@dataclass(frozen=True)
class FusionFit:
    """A fitted fusion: how to call the scorer (`fusion`, `scoring_kwargs()`), and how it was fit."""

    kind: str  # "learned" | "invvar"
    heads: tuple[str, ...]
    scale: tuple[float, ...] | None = None  # a_k (learned)
    offset: tuple[float, ...] | None = None  # b_k (learned)
    weights: tuple[float, ...] | None = None  # w_k (invvar)
    info: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    fusion = "avg"  # both fitted fusions are the avg formula with parameters

    def scoring_kwargs(self) -> dict[str, torch.Tensor | None]:
        def as_t(v: tuple[float, ...] | None) -> torch.Tensor | None:
            return None if v is None else torch.tensor(v, dtype=torch.float32)

        return {"weights": as_t(self.weights), "scale": as_t(self.scale), "offset": as_t(self.offset)}

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "key": self.key, "info": self.info}
        for name in ("scale", "offset", "weights"):
            v = getattr(self, name)
            if v is not None:
                out[name] = {h: float(x) for h, x in zip(self.heads, v, strict=True)}
        out["heads"] = list(self.heads)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FusionFit:
        heads = tuple(d["heads"])

        def get(n: str) -> tuple[float, ...] | None:
            return tuple(float(d[n][h]) for h in heads) if n in d else None

        return cls(d["kind"], heads, get("scale"), get("offset"), get("weights"), dict(d.get("info", {})),
                   d.get("key", ""))


def scoring_args(fusion: str, fit: FusionFit | None) -> dict[str, Any]:
    """Keyword arguments for `grouped_fused_topk` / `rank_split` / `fuse_dense`: {"fusion": max|avg}
    for the paper's fusions, and for a fitted one avg plus its per-head parameters (`scoring_kwargs`)."""
    if fit is None:
        if fusion in FITTED:
            raise ValueError(f"fusion {fusion!r} needs its fitted parameters")
        return {"fusion": fusion}
    return {"fusion": fit.fusion, **fit.scoring_kwargs()}


def identity_fit(kind: str, heads: Iterable[str], **info: Any) -> FusionFit:
    heads = tuple(heads)
    ones, zeros = (1.0,) * len(heads), (0.0,) * len(heads)
    if kind == "learned":
        return FusionFit(kind, heads, scale=ones, offset=zeros, info=info)
    return FusionFit(kind, heads, weights=ones, info=info)


# ---------------------------------------------------------------------------------------------
# per-head scores over each head's eligible items


def head_items(eligible: torch.Tensor) -> list[torch.Tensor]:
    """Item ids of Ω_k per head (padding 0 left out)."""
    elig = eligible.detach().to("cpu", torch.bool).clone()
    elig[:, 0] = False
    return [torch.nonzero(row).flatten() for row in elig]


@torch.no_grad()
def head_log_normalisers(q: torch.Tensor, item_vecs: torch.Tensor, score_fn: ScoreFn, eligible: torch.Tensor,
                         items: list[torch.Tensor] | None = None) -> torch.Tensor:
    """logsumexp_{j ∈ Ω_k} s_k(j) per user and head, [B, K], for q [B, K, d]: the normaliser of
    head k's in-group softmax. Cost Σ_k |Ω_k| scores per user (as grouped scoring), in item chunks.
    A head with an empty Ω_k gets +inf (it never scores)."""
    idx = head_items(eligible) if items is None else items
    out = torch.full(q.shape[:2], float("inf"), device=q.device)
    chunk = max(1, FIT_CHUNK_ELEMENTS // max(1, q.shape[0]))
    for k, members in enumerate(idx):
        if not len(members):
            continue
        members = members.to(item_vecs.device)
        parts = [score_fn(q[:, k], item_vecs.index_select(0, members[s : s + chunk])).float().logsumexp(dim=1)
                 for s in range(0, len(members), chunk)]
        out[:, k] = torch.stack(parts, dim=1).logsumexp(dim=1)
    return out


def router_offsets(route: torch.Tensor, normalisers: torch.Tensor) -> torch.Tensor:
    """Per-user head offsets [B, K] that turn max fusion into routed fusion:
    max_k s_k(i) + log p(k | h) − logsumexp_{Ω_k} s_k = max_k log p(k | h) p(i | k, h)."""
    return route - normalisers


@torch.no_grad()
def head_variances(
    queries: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    item_vecs: torch.Tensor,
    score_fn: ScoreFn,
    eligible: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """(Var_k [K], users counted per head [K]): mean over users of the variance of head k's scores
    over Ω_k. `queries` yields (q [b, K, d], user_heads [b, K] bool or None) batches. Cost: Σ_k |Ω_k|
    scores per user, as grouped scoring. NaN where undefined (|Ω_k| < 2 or no user)."""
    idx = head_items(eligible)
    n_heads = len(idx)
    total = np.zeros(n_heads)
    users = np.zeros(n_heads, dtype=np.int64)
    for q, allowed in queries:
        for k in range(n_heads):
            if len(idx[k]) < 2:
                continue
            s = score_fn(q[:, k], item_vecs.index_select(0, idx[k].to(item_vecs.device))).double()
            v = s.var(dim=1, unbiased=False)
            if allowed is not None:
                v = v[allowed[:, k].to(v.device)]
            total[k] += float(v.sum())
            users[k] += int(v.numel())
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(users > 0, total / np.maximum(users, 1), np.nan)
    var[[len(i) < 2 for i in idx]] = np.nan
    return var, users


def inverse_variance_weights(variances) -> np.ndarray:
    """w_k = 1 / Var_k, scaled so max w = 1; undefined variances take the median of the others
    (all undefined: every weight 1); a zero variance is floored at 1e-12 of the largest."""
    var = np.asarray(variances, dtype=np.float64).copy()
    ok = np.isfinite(var)
    if not ok.any():
        return np.ones(len(var))
    var[~ok] = np.median(var[ok])
    var = np.maximum(var, max(float(var.max()) * 1e-12, 1e-300))
    w = 1.0 / var
    return w / w.max()


# ---------------------------------------------------------------------------------------------
# learned calibration


def calibrated_mean(
    scores: torch.Tensor,
    head: torch.Tensor,
    item: torch.Tensor,
    mask: torch.Tensor | None,
    count: torch.Tensor,
    log_scale: torch.Tensor,
    offset: torch.Tensor,
    n_cols: int,
) -> torch.Tensor:
    """Differentiable avg of calibrated heads over flat per-(head, item) scores.

    scores [U, M]: column j is head `head[j]` scoring item `item[j]` (every eligible pair, see
    `flat_head_scores`); mask [U, M] (1 where the user may use that column's head; None = all);
    count [U, N+1] = allowed eligible heads per item -> fused [U, N+1] (-inf: no head). Memory: a
    few [U, M] and [U, N+1] tensors whatever the head count."""
    contrib = scores * torch.exp(log_scale)[head] + offset[head]
    if mask is not None:
        contrib = contrib * mask
    total = torch.zeros(scores.shape[0], n_cols, dtype=contrib.dtype).index_add(1, item, contrib)
    return (total / count.clamp(min=1)).masked_fill(count == 0, NEG_INF)


@torch.no_grad()
def flat_head_scores(q: torch.Tensor, item_vecs: torch.Tensor, score_fn: ScoreFn, eligible: torch.Tensor,
                     batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [U, M] float32 on CPU, head [M], item [M]) for every eligible (head, item) pair,
    M = Σ_k |Ω_k| (padding left out) — the cost of grouped scoring, not K × N."""
    index = head_items(eligible)
    head = torch.cat([torch.full((len(idx),), k, dtype=torch.long) for k, idx in enumerate(index)])
    item = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    cols = []
    for k, idx in enumerate(index):
        vecs = item_vecs.index_select(0, idx.to(item_vecs.device))
        parts = [score_fn(q[a : a + batch, k], vecs).float().cpu() for a in range(0, len(q), batch)]
        cols.append(torch.cat(parts) if parts else torch.zeros(0, len(idx)))
    return torch.cat(cols, dim=1), head, item


def _first_occurrence(targets: torch.Tensor) -> torch.Tensor:
    same = targets.unsqueeze(2) == targets.unsqueeze(1)  # [U, τ, τ]
    earlier = torch.tril(torch.ones(targets.shape[1], targets.shape[1], dtype=torch.bool), diagonal=-1)
    return ~(same & earlier).any(2)


@dataclass
class _CalibrationData:
    """What the `learned` fit's loss reads, cached once: the users kept (a target to score) and their
    flat eligible (head, item) scores."""

    scores: torch.Tensor  # [U, M] float, M = eligible (head, item) pairs
    head: torch.Tensor  # [M]
    item: torch.Tensor  # [M]
    allowed: torch.Tensor | None  # [U, K] float, None = every head for every user
    count: torch.Tensor  # [U, N+1] allowed eligible heads per item
    blocked: torch.Tensor  # [U, N+1] bool: no allowed head, or history
    targets: torch.Tensor  # [U, τ]
    valid: torch.Tensor  # [U, τ] bool: a distinct target that can be scored
    n_cols: int  # N + 1

    def cross_entropy(self, log_scale: torch.Tensor, offset: torch.Tensor, backward: bool = False) -> torch.Tensor:
        """The mean -log softmax of the valid targets under (log a, b). The loss is a sum over users:
        evaluated (and differentiated) in chunks of users, so the graph holds a few [chunk, M] and
        [chunk, N+1] double tensors whatever the number of users."""
        chunk = max(1, FIT_CHUNK_ELEMENTS // max(1, self.scores.shape[1] + self.n_cols))
        n_valid = float(self.valid.sum())
        total = torch.zeros((), dtype=torch.float64)
        for c0 in range(0, len(self.scores), chunk):
            c1 = c0 + chunk
            mask = None if self.allowed is None else self.allowed[c0:c1][:, self.head].double()
            fused = calibrated_mean(self.scores[c0:c1].double(), self.head, self.item, mask,
                                    self.count[c0:c1].double(), log_scale, offset, self.n_cols)
            fused = fused.masked_fill(self.blocked[c0:c1], NEG_INF)
            logp = torch.log_softmax(fused, dim=1).gather(1, self.targets[c0:c1])
            part = -torch.where(self.valid[c0:c1], logp, 0.0).sum() / n_valid
            if backward:
                part.backward()
            total = total + part.detach()
        return total


def _calibration_data(q, item_vecs, score_fn, eligible, targets, exclude, user_heads,
                      info: dict[str, Any]) -> _CalibrationData | None:
    """The fit's cached inputs (see `fit_calibration`); None when there is nothing to fit. Fills
    info's `users` and `targets`."""
    n_users, n_heads, _ = q.shape
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    allowed = torch.ones(n_users, n_heads) if user_heads is None else user_heads.to("cpu").float()
    elig = eligible.detach().to("cpu", torch.bool).clone()
    elig[:, 0] = False
    count = allowed @ elig.float()  # [U, N+1]
    blocked = count == 0
    if exclude is not None:
        blocked = blocked | torch.as_tensor(exclude).to("cpu", torch.bool)
    tgt_blocked = blocked.gather(1, targets) | (targets == 0)
    valid = ~tgt_blocked & _first_occurrence(targets)
    keep = valid.any(1)
    info.update(users=int(keep.sum()), targets=int(valid.sum()))
    if n_heads == 1 or not bool(keep.any()):
        return None
    rows = torch.nonzero(keep).flatten()
    scores, head, item = flat_head_scores(q[rows].float(), item_vecs.float(), score_fn, eligible)
    return _CalibrationData(scores, head, item, None if user_heads is None else allowed[rows], count[rows],
                            blocked[rows], targets[rows], valid[rows], item_vecs.shape[0])


def _lbfgs(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], max_iter: int) -> int:
    """Full-batch L-BFGS (strong Wolfe) on `loss_fn`, which computes its own gradients; the iterations run."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        return loss_fn()

    opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0))


def _canonical_gauge(a: np.ndarray, b: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(log a, b) → (a, b) with geometric mean of a = 1 and mean of b = 0 (the ranking does not change)."""
    m = float(a.mean())
    if m < -MAX_LOG_RESCALE:
        # the fit drove the common temperature towards 0 (seen on barely trained runs): in the
        # canonical gauge the offsets would be ~1e9 and float32 scores would tie, so keep none
        a, b, m = np.zeros_like(a), np.zeros_like(b), 0.0
        info["fallback"] = True
        info["ce_learned"] = info["ce_avg"]
    return np.exp(a - m), (b - b.mean()) * math.exp(-m)


def fit_calibration(
    q: torch.Tensor,
    item_vecs: torch.Tensor,
    score_fn: ScoreFn,
    eligible: torch.Tensor,
    targets: torch.Tensor | np.ndarray,
    exclude: torch.Tensor | None = None,
    user_heads: torch.Tensor | None = None,
    *,
    max_iter: int = FIT_MAX_ITER,
    l2: float = FIT_L2,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit `learned` fusion: (scale a [K], offset b [K], info), in the canonical gauge.

    q [U, K, d] head queries of the validation users (already subsampled), targets [U, τ] (0 =
    none), exclude [U, N+1] bool (history), user_heads [U, K] bool. Minimises the mean over
    (user, distinct target) pairs of -log softmax_i(fused_u(i))[target] + l2 (|α - ᾱ|² + |b - b̄|²) / K,
    fused = avg of calibrated heads, with full-batch L-BFGS (strong Wolfe). Targets no allowed head
    may score, or in the history, are left out. info: users, targets, ce_avg (a=1, b=0: plain avg),
    ce_avg_temperature (avg with the best single global temperature — what calibration gains beyond a
    temperature), ce_learned, iterations.
    """
    n_heads = q.shape[1]
    info: dict[str, Any] = {}
    data = _calibration_data(q, item_vecs, score_fn, eligible, targets, exclude, user_heads, info)
    if data is None:
        return np.ones(n_heads), np.zeros(n_heads), {**info, "iterations": 0}
    ce, zeros = data.cross_entropy, torch.zeros(n_heads, dtype=torch.float64)
    with torch.no_grad():
        info["ce_avg"] = float(ce(zeros, zeros))
    # a single global temperature, for reference: how much of the gain a temperature alone gives
    g = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    _lbfgs([g], lambda: ce(g.expand(n_heads), zeros, backward=True), max_iter)
    with torch.no_grad():
        info["ce_avg_temperature"] = float(ce(g.detach().expand(n_heads), zeros))
    alpha = torch.zeros(n_heads, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(n_heads, dtype=torch.float64, requires_grad=True)

    def objective() -> torch.Tensor:
        # only what changes the ranking is pulled to 0: a common temperature or shift is free
        reg = l2 * ((alpha - alpha.mean()).square().sum() + (beta - beta.mean()).square().sum()) / n_heads
        reg.backward()
        return ce(alpha, beta, backward=True) + reg.detach()

    info["iterations"] = _lbfgs([alpha, beta], objective, max_iter)
    with torch.no_grad():
        info["ce_learned"] = float(ce(alpha, beta))
        if not math.isfinite(info["ce_learned"]) or info["ce_learned"] > info["ce_avg"]:
            # never worse than where it started (a failed line search, a degenerate fit)
            alpha.zero_()
            beta.zero_()
            info["ce_learned"] = info["ce_avg"]
            info["fallback"] = True
    scale, offset = _canonical_gauge(alpha.detach().numpy(), beta.detach().numpy(), info)
    return scale, offset, info
