"""Top-k retrieval over the full catalogue with scores fused over each item's eligible heads.

Paper §3.5: item `i` is scored only by its eligible heads `H(i) = {k : i ∈ Ω_k}` (and, with user
priors, only by heads the user may use); the scores are fused by **max** (the winning head is the
explanation) or by **avg** (mean over the eligible heads). An item with no eligible head is never
recommended; item 0 (padding) never is either.

Two implementations with one signature and the same results:

- `dense_fused_topk` — the obviously-correct reference: all `[B, K, N+1]` scores, ineligible ones
  set to -inf, fused, history excluded, top-k. Cost grows with the head count K.
- `grouped_fused_topk` — the fast path: items are grouped by their eligible-head
  *pattern* (the set `H(i)`), cached once per eligibility matrix in a `ScoringPlan`. Each large
  pattern is one block `(heads P, items I)`, scored with one matmul `[B, |P|, d] × [|I|, d]` and
  reduced over P, so the cost is `Σ_i |H(i)|` — "heads per item" times one head, not K times. Rare
  patterns (too few items for a block of their own) are scored head by head and scatter-maxed
  (scatter-added for avg). Scores live in plan order, where every block is a contiguous slice.

Determinism: in both, among heads that tie for an item's max the lowest head id wins, and among
items with equal fused scores the lower item id ranks first (also at the k-th place). Slots that no
recommendable item can fill (k above the number of candidates) hold item 0, score -inf, head -1.
The winner is -1 under avg fusion.

Calibrated and weighted fusion (`mhr.ranking.fusion`): both functions take optional per-head parameters
`scale` a, `offset` b (max and avg) and `weights` w (avg only), each [K] or per user [B, K]; heads
are fused as max_k (a_k s_k + b_k) or Σ w_k (a_k s_k + b_k) / Σ w_k over the eligible heads. Left
out, they are 1, 0, 1: the paper's max and avg. `mhr.ranking.fusion.fuse_dense` is the formula.

`score_fn(q[..., d], items[M, d]) -> [..., M]` is the model's scorer (cosine with temperature, or
dot); it is applied to item slices, so it must score each item independently of the others.
"""

from __future__ import annotations

import bisect
import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from mhr.models.heads import ScoreFn
from mhr.ranking.fusion import FORMULAS, NEG_INF, fuse_dense, per_head

# history to exclude: a bool mask [B, N+1] (tensor or array), or CSR rows (indptr [B+1], item ids)
Exclude = torch.Tensor | np.ndarray | tuple[np.ndarray, np.ndarray] | None

# elements of one intermediate score tensor (64 MiB of float32) and of the fused [B, N+1] buffer
_BLOCK_ELEMENTS = 1 << 20
_BUFFER_ELEMENTS = 1 << 26
# fused scores of one slab of the catalogue (8 MiB of float32, reused slab after slab), and the
# users ranked together by the grouped path when the caller gives no batch size
_SLAB_ELEMENTS = 1 << 21
_USER_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# shared pieces


def _check(q: torch.Tensor, item_vecs: torch.Tensor, eligible: torch.Tensor, fusion: str, k: int) -> None:
    if fusion not in FORMULAS:
        raise ValueError(f"unknown fusion {fusion!r}; use one of {FORMULAS}")
    if q.dim() != 3 or item_vecs.dim() != 2 or q.shape[-1] != item_vecs.shape[-1]:
        raise ValueError(
            f"need q [B, K, d] and item_vecs [N+1, d], got {tuple(q.shape)}, {tuple(item_vecs.shape)}"
        )
    if tuple(eligible.shape) != (q.shape[1], item_vecs.shape[0]):
        raise ValueError(
            f"eligible must be [K, N+1] = [{q.shape[1]}, {item_vecs.shape[0]}], got {tuple(eligible.shape)}"
        )
    if k < 1:
        raise ValueError("k must be >= 1")


def _exclusion_rows(
    exclude: Exclude, start: int, stop: int, n_cols: int, device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The items to exclude for users [start, stop) as (row in chunk, item id) index pairs."""
    if exclude is None:
        return None
    if isinstance(exclude, tuple):
        indptr, items = (np.asarray(a) for a in exclude)
        lo, hi = int(indptr[start]), int(indptr[stop])
        rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
        return (
            torch.from_numpy(rows).to(device),
            torch.as_tensor(items[lo:hi], dtype=torch.long, device=device),
        )
    mask = torch.as_tensor(exclude)[start:stop].to(device)
    if mask.shape[1] != n_cols:
        raise ValueError(f"exclude mask must be [B, N+1] with N+1 = {n_cols}, got {tuple(mask.shape)}")
    rows, items = mask.nonzero(as_tuple=True)  # sparse: cheaper than permuting a [B, N+1] mask
    return rows, items


def _select_topk(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of `scores [B, M]` (column j is item `ids[j]`), ordered by (score desc, item id asc).

    Returns (items [B, k], scores [B, k], columns [B, k]); empty slots: item 0, -inf, column -1.
    `torch.topk` leaves ties unordered, so the order inside the selection is fixed by two sorts,
    and rows where an unselected item ties with the k-th score (rare with real scores) are redone
    exactly.
    """
    b, m = scores.shape
    kk = min(k, m)
    if kk == 0:
        vals, cols = scores[:, :0], torch.zeros(b, 0, dtype=torch.long, device=scores.device)
    else:
        # one extra place shows whether an unselected item ties with the k-th one
        vals, cols = scores.topk(min(kk + 1, m), dim=1)
        if vals.shape[1] > kk:
            kth = vals[:, kk - 1]
            tied = (vals[:, kk] == kth) & torch.isfinite(kth)
            vals, cols = vals[:, :kk].clone(), cols[:, :kk].clone()
            for r in torch.nonzero(tied).flatten().tolist():
                row = scores[r]
                above = torch.nonzero(row > kth[r]).flatten()
                ties = torch.nonzero(row == kth[r]).flatten()
                ties = ties[torch.argsort(ids[ties])][: kk - len(above)]
                cols[r] = torch.cat([above, ties])
                vals[r] = row[cols[r]]
        by_id = torch.argsort(ids[cols], dim=1)
        vals, cols = vals.gather(1, by_id), cols.gather(1, by_id)
        by_score = torch.argsort(vals, dim=1, descending=True, stable=True)
        vals, cols = vals.gather(1, by_score), cols.gather(1, by_score)
    items = ids[cols]
    empty = torch.isneginf(vals) | torch.isnan(vals)
    items = items.masked_fill(empty, 0)
    cols = cols.masked_fill(empty, -1)
    if kk < k:  # fewer candidate columns than k: pad
        pad = k - kk
        items = torch.cat([items, items.new_zeros(b, pad)], 1)
        vals = torch.cat([vals, vals.new_full((b, pad), NEG_INF)], 1)
        cols = torch.cat([cols, cols.new_full((b, pad), -1)], 1)
    return items, vals, cols


HeadParam = torch.Tensor | np.ndarray | None


def _head_params(n_heads: int, device, fusion: str, weights, scale, offset):
    if fusion == "max" and weights is not None:
        raise ValueError("weights apply to avg fusion; use scale/offset to calibrate max")
    return (
        per_head(weights, n_heads, device, "weights", positive=True),
        per_head(scale, n_heads, device, "scale", positive=True),
        per_head(offset, n_heads, device, "offset"),
    )


def _rows(param: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """A [1, K] parameter as is, a [B, K] one restricted to users [start, stop)."""
    if param is None or param.shape[0] == 1:
        return param
    return param[start:stop]


def _user_chunk(n_users: int, n_cols: int, batch_size: int | None) -> int:
    return batch_size or max(1, min(n_users, _BUFFER_ELEMENTS // max(1, n_cols)))


# ---------------------------------------------------------------------------------------------
# the dense reference


@torch.no_grad()
def dense_fused_topk(
    q: torch.Tensor,
    item_vecs: torch.Tensor,
    score_fn: ScoreFn,
    eligible: torch.Tensor,
    user_heads: torch.Tensor | None,
    exclude: Exclude,
    k: int,
    fusion: str = "max",
    batch_size: int | None = None,
    *,
    weights: HeadParam = None,
    scale: HeadParam = None,
    offset: HeadParam = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference fused top-k: every head scores every item, then the masks apply.

    q [B, K, d] head queries; item_vecs [N+1, d]; eligible [K, N+1] bool (Ω_k); user_heads [B, K]
    bool (None = all heads); exclude: history mask [B, N+1] or CSR (indptr, item ids); fusion
    "max" | "avg"; weights / scale / offset: per-head [K] or [B, K] (module doc). Returns
    top_items [B, k] int64, top_scores [B, k], top_winner_head [B, k] int64.
    """
    _check(q, item_vecs, eligible, fusion, k)
    b, n_heads, _ = q.shape
    n_cols = item_vecs.shape[0]
    device = q.device
    weights, scale, offset = _head_params(n_heads, device, fusion, weights, scale, offset)
    elig = eligible.to(device).clone()
    elig[:, 0] = False
    ids = torch.arange(n_cols, device=device)
    chunk = max(1, min(_user_chunk(b, n_cols, batch_size), _BLOCK_ELEMENTS * 4 // max(1, n_heads * n_cols)))
    out = []
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        s = score_fn(q[start:stop], item_vecs).float()  # [b, K, N+1]
        allowed = elig.unsqueeze(0).expand(stop - start, -1, -1)
        if user_heads is not None:
            allowed = allowed & user_heads[start:stop].to(device).unsqueeze(-1)
        fused, winner = fuse_dense(s, allowed, fusion, _rows(weights, start, stop), _rows(scale, start, stop),
                                   _rows(offset, start, stop))
        ex = _exclusion_rows(exclude, start, stop, n_cols, device)
        if ex is not None:
            fused[ex[0], ex[1]] = NEG_INF
        items, vals, cols = _select_topk(fused, ids, k)
        win = winner.gather(1, cols.clamp(min=0)).masked_fill(cols < 0, -1)
        out.append((items, vals, win))
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# the plan: items grouped by eligible-head pattern


@dataclass(frozen=True)
class Block:
    """Items at plan positions [start, stop), all eligible for exactly the heads `heads`."""

    heads: torch.Tensor  # int64 [|P|], ascending
    start: int
    stop: int


class ScoringPlan:
    """The eligibility matrix Ω [K, N+1] arranged for grouped scoring; build once per model.

    Plan order (positions 0..n_eligible-1) lists the items with at least one eligible head:
    first multi-head blocks, then the rare-pattern region scored head by head, then single-head
    blocks; inside each part items ascend by id. A pattern shared by at least `min_block_items`
    items gets its own block (default: max(64, N // 256), so at most a few hundred blocks).
    """

    def __init__(self, eligible: torch.Tensor, min_block_items: int | None = None) -> None:
        device = eligible.device
        elig = eligible.detach().to("cpu", torch.bool).numpy().copy()
        elig[:, 0] = False
        n_heads, n_cols = elig.shape
        self.n_heads, self.n_cols = n_heads, n_cols
        self.device = device
        min_items = min_block_items if min_block_items is not None else max(64, (n_cols - 1) // 256)
        patterns, inverse, counts = np.unique(
            np.packbits(elig.T, axis=1), axis=0, return_inverse=True, return_counts=True
        )
        inverse = inverse.reshape(-1)
        pattern_heads = np.unpackbits(patterns, axis=1, count=n_heads).astype(bool)  # [P, K]
        sizes = pattern_heads.sum(1)
        items_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
        by_first_item = sorted(range(len(patterns)), key=lambda p: items_of[p][0])
        multi = [p for p in by_first_item if sizes[p] > 1 and counts[p] >= min_items]
        single = [p for p in by_first_item if sizes[p] == 1 and counts[p] >= min_items]
        rare = [p for p in range(len(patterns)) if sizes[p] >= 1 and counts[p] < min_items]

        order: list[np.ndarray] = []
        blocks: list[Block] = []
        pos = 0

        def add_block(p: int) -> None:
            nonlocal pos
            items = items_of[p]
            order.append(items)
            heads = torch.from_numpy(np.flatnonzero(pattern_heads[p])).to(device)
            blocks.append(Block(heads, pos, pos + len(items)))
            pos += len(items)

        for p in multi:
            add_block(p)
        rare_items = np.sort(np.concatenate([items_of[p] for p in rare])) if rare else np.zeros(0, np.int64)
        order.append(rare_items)
        self.rare_start, self.rare_stop = pos, pos + len(rare_items)
        pos += len(rare_items)
        for p in single:
            add_block(p)
        self.blocks = blocks
        self.n_eligible = pos
        order_np = np.concatenate(order).astype(np.int64)
        self.order = torch.from_numpy(order_np).to(device)  # position -> item id
        position = np.full(n_cols, -1, dtype=np.int64)
        position[order_np] = np.arange(len(order_np))
        self.position = torch.from_numpy(position).to(device)  # item id -> position (-1: never)
        rare_elig = elig[:, rare_items]  # [K, R]
        self.rare_eligible = torch.from_numpy(rare_elig).to(device)
        self.rare_heads = [
            (h, torch.from_numpy(np.flatnonzero(rare_elig[h])).to(device))
            for h in range(n_heads)
            if rare_elig[h].any()
        ]
        self.eligible = torch.from_numpy(elig).to(device)  # [K, N+1], item 0 never: winners
        self._block_starts = [blk.start for blk in blocks]
        self._ordered: tuple | None = None  # (weakref to item_vecs, version key, reordered): `ordered`
        self.mean_heads_per_item = float(elig[:, 1:].sum() / max(1, n_cols - 1))
        whole = len(blocks) == 1 and len(blocks[0].heads) == 1 and not len(rare_items)
        self.single_head = int(blocks[0].heads[0]) if whole else None

    def ordered(self, item_vecs: torch.Tensor) -> torch.Tensor:
        """`item_vecs` [N+1, d] in plan order. The last one is kept, so that ranking a split batch
        by batch against the same (unchanged) tensor reorders it once, not once per batch."""
        key = (item_vecs.device, item_vecs.shape, item_vecs.dtype, item_vecs._version)
        cached = self._ordered
        if cached is not None and cached[0]() is item_vecs and cached[1] == key:
            return cached[2]
        out = item_vecs.index_select(0, self.order.to(item_vecs.device))
        self._ordered = (weakref.ref(item_vecs), key, out)
        return out

    def blocks_in(self, s0: int, s1: int) -> list[Block]:
        """The blocks that overlap plan positions [s0, s1), in plan order."""
        first = max(0, bisect.bisect_right(self._block_starts, s0) - 1)
        out = []
        for blk in self.blocks[first:]:
            if blk.start >= s1:
                break
            if blk.stop > s0:
                out.append(blk)
        return out

    def __repr__(self) -> str:
        return (
            f"ScoringPlan(K={self.n_heads}, N={self.n_cols - 1}, blocks={len(self.blocks)}, "
            f"rare={self.rare_stop - self.rare_start}, heads/item={self.mean_heads_per_item:.2f})"
        )


_PLANS: OrderedDict[tuple, ScoringPlan] = OrderedDict()


def plan_for(eligible: torch.Tensor) -> ScoringPlan:
    """The cached `ScoringPlan` of an eligibility matrix (keyed by its content; a few kept)."""
    packed = np.packbits(eligible.detach().to("cpu", torch.bool).numpy())
    key = (tuple(eligible.shape), str(eligible.device), hashlib.sha1(packed.tobytes()).hexdigest())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = ScoringPlan(eligible)
        while len(_PLANS) > 8:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return plan


# ---------------------------------------------------------------------------------------------
# the grouped fast path


@torch.no_grad()
def grouped_fused_topk(
    q: torch.Tensor,
    item_vecs: torch.Tensor,
    score_fn: ScoreFn,
    eligible: torch.Tensor | ScoringPlan,
    user_heads: torch.Tensor | None,
    exclude: Exclude,
    k: int,
    fusion: str = "max",
    batch_size: int | None = None,
    *,
    weights: HeadParam = None,
    scale: HeadParam = None,
    offset: HeadParam = None,
    slab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused top-k whose cost follows the eligible heads; same arguments and results as
    `dense_fused_topk` (scores equal up to float rounding). `eligible` may be a prepared
    `ScoringPlan`; a bool [K, N+1] matrix is looked up in a small content-keyed plan cache.

    The catalogue is streamed in slabs of plan positions (`slab` positions, default what keeps one
    slab's fused scores at `_SLAB_ELEMENTS`): each slab's scores go into one reused buffer, and only
    the positions at or above a user's running k-th score join that user's running top-k; the
    max-fusion winner is found afterwards for the k selected items alone. No [B, N] buffer is
    allocated, so memory and page faults do not grow with the catalogue."""
    plan = eligible if isinstance(eligible, ScoringPlan) else plan_for(eligible)
    b, n_heads, _ = q.shape
    if fusion not in FORMULAS:
        raise ValueError(f"unknown fusion {fusion!r}; use one of {FORMULAS}")
    if (plan.n_heads, plan.n_cols) != (n_heads, item_vecs.shape[0]) or k < 1:
        raise ValueError(
            f"plan is [{plan.n_heads}, {plan.n_cols}], q/item_vecs give [{n_heads}, {item_vecs.shape[0]}]; k={k}"
        )
    device = q.device
    weights, scale, offset = _head_params(n_heads, device, fusion, weights, scale, offset)
    order = plan.order.to(device)
    vecs = plan.ordered(item_vecs)  # plan order: every block is a contiguous slice
    chunk = batch_size or max(1, min(b, _USER_CHUNK))
    out = []
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        uh = None if user_heads is None else user_heads[start:stop].to(device)
        if uh is not None and bool(uh.all()):
            uh = None
        params = tuple(_rows(p, start, stop) for p in (weights, scale, offset))
        ex = _exclusion_rows(exclude, start, stop, plan.n_cols, device)
        if ex is not None:
            pos = plan.position.to(device)[ex[1]]
            keep = pos >= 0
            ex = (ex[0][keep], pos[keep])
        width = slab or max(1, _SLAB_ELEMENTS // (stop - start))
        items, vals = _stream_topk(plan, q[start:stop], vecs, order, score_fn, uh, fusion, params, ex, k, width)
        if fusion == "max":
            win = _winners(plan, q[start:stop], item_vecs, score_fn, uh, params[1], params[2], items, vals)
        else:
            win = torch.full_like(items, -1)
        out.append((items, vals, win))
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


def _stream_topk(plan, q, vecs, order, score_fn, user_heads, fusion, params, ex, k, width):
    """(items, scores) [b, k]: the fused top-k of one user chunk, slab by slab (see
    `grouped_fused_topk`). After the first slab a row's candidates are its positions scoring at
    least its running k-th score — a tie may still win on the lower item id — so the selection
    over a slab is a comparison and a gather, not a sort."""
    b, device = q.shape[0], q.device
    width = min(width, max(1, plan.n_eligible))
    buffer = torch.empty(b * width, device=device)
    best = None
    for s0 in range(0, plan.n_eligible, width):
        s1 = min(plan.n_eligible, s0 + width)
        fused = buffer[: b * (s1 - s0)].view(b, s1 - s0)
        _fuse_range(plan, q, vecs, score_fn, user_heads, fusion, *params, s0=s0, s1=s1, fused=fused)
        if ex is not None:
            inside = (ex[1] >= s0) & (ex[1] < s1)
            fused[ex[0][inside], ex[1][inside] - s0] = NEG_INF
        ids = order[s0:s1]
        if best is None:
            items, vals, _ = _select_topk(fused, ids, k)
            best = (items, torch.where(torch.isnan(vals), NEG_INF, vals))
            continue
        kth = best[1][:, -1:]
        floor = torch.where(torch.isneginf(kth), torch.finfo(fused.dtype).min, kth)  # -inf never joins
        rows, cols = torch.nonzero(fused >= floor, as_tuple=True)
        if len(rows):
            best = _merge_topk(best, _padded(rows, cols, fused, ids, b), k)
    if best is None:  # nothing is recommendable
        return q.new_zeros(b, k, dtype=torch.long), q.new_full((b, k), NEG_INF)
    items, vals = best
    return items.masked_fill(torch.isneginf(vals), 0), vals


def _padded(rows: torch.Tensor, cols: torch.Tensor, fused: torch.Tensor, ids: torch.Tensor, b: int):
    """Candidates (row, column) of a slab, row-sorted, as (items, scores) [b, c], padded with
    (0, -inf); c is the most candidates of any row."""
    counts = torch.bincount(rows, minlength=b)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - first[rows]
    width = int(counts.max())
    items = torch.zeros(b, width, dtype=torch.long, device=rows.device)
    vals = torch.full((b, width), NEG_INF, device=rows.device)
    items[rows, slot] = ids[cols]
    vals[rows, slot] = fused[rows, cols]
    return items, vals


def _merge_topk(a, b, k: int):
    """The top-k of two selections (items, scores) [B, *] in the order of `_select_topk`
    (score desc, item id asc); empty slots (item 0, -inf) sort last."""
    items, vals = (torch.cat(pair, 1) for pair in zip(a, b, strict=True))
    by_id = torch.argsort(items, dim=1, stable=True)
    items, vals = items.gather(1, by_id), vals.gather(1, by_id)
    by_score = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :k]
    return items.gather(1, by_score), vals.gather(1, by_score)


def _winners(plan, q, item_vecs, score_fn, user_heads, scale, offset, items, vals) -> torch.Tensor:
    """The max-fusion winner of each selected item: the lowest head among those the user may use
    and the item is eligible for whose (calibrated) score is highest; -1 for empty slots."""
    device = q.device
    allowed = plan.eligible.to(device).T[items]  # [b, k, K]
    if user_heads is not None:
        allowed = allowed & user_heads.unsqueeze(1)
    win = torch.full_like(items, -1)
    for r in range(items.shape[0]):
        s = score_fn(q[r], item_vecs.index_select(0, items[r])).float()  # [K, k]
        if scale is not None:
            s = s * _rows(scale, r, r + 1).reshape(-1, 1)
        if offset is not None:
            s = s + _rows(offset, r, r + 1).reshape(-1, 1)
        win[r] = s.T.masked_fill(~allowed[r], NEG_INF).argmax(1)
    return win.masked_fill(torch.isneginf(vals) | (items == 0), -1)


def _fuse_range(
    plan: ScoringPlan,
    q: torch.Tensor,
    vecs: torch.Tensor,
    score_fn: ScoreFn,
    user_heads: torch.Tensor | None,
    fusion: str,
    weights: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    *,
    s0: int,
    s1: int,
    fused: torch.Tensor,
) -> None:
    """Fused scores of plan positions [s0, s1) into `fused [b, s1-s0]`.

    weights / scale / offset: None or [1|b, K] float (checked by the caller)."""
    b = q.shape[0]
    device = q.device
    if plan.single_head is not None and user_heads is None:
        # one head scores every eligible item: a plain matmul
        h = plan.single_head
        s = score_fn(q[:, h], vecs[s0:s1]).float()
        if scale is not None:
            s = s * scale[:, h : h + 1]
        if offset is not None:
            s = s + offset[:, h : h + 1]
        fused.copy_(s)
        return
    for blk in plan.blocks_in(s0, s1):
        heads = blk.heads.to(device)
        qp = q.index_select(1, heads)  # [b, p, d]
        qh = qp.transpose(0, 1).contiguous() if fusion == "max" else None  # [p, b, d]
        p = len(heads)
        allowed = None if user_heads is None else user_heads.index_select(1, heads)  # [b, p]
        sc = None if scale is None else scale.index_select(1, heads).unsqueeze(-1)  # [1|b, p, 1]
        of = None if offset is None else offset.index_select(1, heads).unsqueeze(-1)
        ww = None
        if weights is not None:  # [1|b, p] -> [b, p], zero for heads the user may not use
            ww = weights.index_select(1, heads).expand(b, -1)
            if allowed is not None:
                ww = torch.where(allowed, ww, 0.0)
            wsum = ww.sum(1, keepdim=True)
        step = max(1, _BLOCK_ELEMENTS // max(1, b * p))
        for a0 in range(max(blk.start, s0), min(blk.stop, s1), step):
            a1 = min(blk.stop, s1, a0 + step)
            cols = slice(a0 - s0, a1 - s0)
            if fusion == "max":
                # heads outermost, [p, b, m]: the max over heads is then elementwise over rows
                s = score_fn(qh, vecs[a0:a1]).float()
                if sc is not None:
                    s = s * sc.transpose(0, 1)
                if of is not None:
                    s = s + of.transpose(0, 1)
                if allowed is not None:
                    s.masked_fill_(~allowed.T.unsqueeze(-1), NEG_INF)
                torch.amax(s, dim=0, out=fused[:, cols])  # winners: `_winners`, for the selection only
                continue
            s = score_fn(qp, vecs[a0:a1]).float()  # [b, p, m]
            if sc is not None:
                s = s * sc
            if of is not None:
                s = s + of
            if ww is not None:
                total = torch.bmm(ww.unsqueeze(1), s).squeeze(1)  # Σ_k w_k t_k: [b, m]
                fused[:, cols] = (total / torch.where(wsum > 0, wsum, 1.0)).masked_fill(wsum == 0, NEG_INF)
            else:
                if allowed is None:
                    fused[:, cols] = s.mean(1)
                else:
                    count = allowed.sum(1, keepdim=True)  # [b, 1]
                    total = torch.where(allowed.unsqueeze(-1), s, 0.0).sum(1)
                    fused[:, cols] = (total / count.clamp(min=1)).masked_fill(count == 0, NEG_INF)
    r0, r1 = max(plan.rare_start, s0), min(plan.rare_stop, s1)
    if r0 < r1:
        _fuse_rare(plan, q, vecs, score_fn, user_heads, fusion, fused[:, r0 - s0 : r1 - s0], weights, scale, offset,
                   r0=r0, r1=r1)


def _fuse_rare(plan, q, vecs, score_fn, user_heads, fusion, fused,
               weights=None, scale=None, offset=None, *, r0: int, r1: int) -> None:
    """Rare patterns at plan positions [r0, r1) (inside the rare region): head by head over its
    items there, scatter-max (or weighted sum and weight) into `fused` [b, r1-r0]."""
    device = q.device
    rare_vecs = vecs[r0:r1]
    lo, hi = r0 - plan.rare_start, r1 - plan.rare_start  # rare-region offsets

    def heads_here():
        for h, idx in plan.rare_heads:
            idx = idx[int(torch.searchsorted(idx, lo)) : int(torch.searchsorted(idx, hi))]
            if len(idx):
                yield h, (idx - lo).to(device)

    def head_scores(h: int, idx: torch.Tensor) -> torch.Tensor:
        s = score_fn(q[:, h], rare_vecs.index_select(0, idx)).float()  # [b, m]
        if scale is not None:
            s = s * scale[:, h : h + 1]
        if offset is not None:
            s = s + offset[:, h : h + 1]
        return s

    if fusion == "max":
        best = torch.full((q.shape[0], r1 - r0), NEG_INF, device=device)
        for h, idx in heads_here():
            s = head_scores(h, idx)
            if user_heads is not None:
                s.masked_fill_(~user_heads[:, h : h + 1], NEG_INF)
            best.index_copy_(1, idx, torch.maximum(s, best.index_select(1, idx)))
        fused.copy_(best)
    else:
        total = torch.zeros(q.shape[0], r1 - r0, device=device)
        for h, idx in heads_here():
            s = head_scores(h, idx)
            if weights is not None:
                s = s * weights[:, h : h + 1]
            if user_heads is not None:
                s = torch.where(user_heads[:, h : h + 1], s, 0.0)
            total.index_add_(1, idx, s)
        elig = plan.rare_eligible[:, lo:hi].to(device).float()
        if weights is None:
            count = elig.sum(0).expand_as(total) if user_heads is None else user_heads.float() @ elig
            fused.copy_((total / count.clamp(min=1)).masked_fill(count == 0, NEG_INF))
        else:
            w = weights.expand(q.shape[0], -1)
            if user_heads is not None:
                w = torch.where(user_heads, w, 0.0)
            wsum = w @ elig  # [b, R]
            fused.copy_((total / torch.where(wsum > 0, wsum, 1.0)).masked_fill(wsum == 0, NEG_INF))
