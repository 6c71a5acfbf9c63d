"""The multi-head next-τ loss (paper Eq. 6–8; docs/ARCHITECTURE.md, "The method in brief").

Every input position t predicts its next τ items. A *positive* is a (b, t, j, k) with a real
target `targets[b, t, j]` compatible with head k (`compat[b, t, j, k]`); its cross-entropy runs
over the target plus the head's candidate set Ω̃_k only:

    ce(b, t, j, k) = logsumexp_{i ∈ {y} ∪ Ω̃_k} s(q_{b,t,k}, e_i) − s(q_{b,t,k}, e_y)

and the loss is

    loss = Σ_j γ^j Σ_k w_k L_{k,j},   L_{k,j} = (1 / |Y_k|) Σ_{positives of k at offset j} ce

with j the 0-based horizon offset (the paper's γ^(t-1), t 1-based) and |Y_k| the head's positives
in the batch over all offsets, so Σ_j L_{k,j} is head k's mean cross-entropy. Heads without a
positive in the batch get no term. Head weights:

- "frequency": w_k = |Y_k| / Σ_k' |Y_k'|. Then loss = (1 / P) Σ_positives γ^j ce — the mean over
  all (head, positive) pairs (γ-weighted), i.e. a head counts in proportion to its positives.
- "uniform": w_k = 1 / #(heads with a positive): each present head's mean counts equally.

Candidate sets Ω̃_k:

- `negatives=None` (full softmax): Ω̃_k = Ω_k (`negatives_from="group"`) or the whole catalogue
  (`"global"`). `global_ratio = p > 0` (group only) adds out-of-group items: every item outside
  Ω_k joins head k's softmax for this call independently with probability p (one Bernoulli draw
  per (head, item), from `generator`). p = 0 is the paper's in-group softmax, p = 1 the global
  one; in between, a head sees the expected share p of the rest of the catalogue.
- `negatives=n` (sampled softmax): each head draws n negatives per call, with replacement, shared
  by all its positives in the batch (as TensorFlow's sampled softmax shares them across a batch;
  per-positive draws would cost a [P, n, d] gather): round(p · n) uniform over the whole catalogue
  (items 1..N), the rest uniform over Ω_k (all n from the catalogue with `negatives_from="global"`).
  Per positive, a negative equal to the target is masked out of its softmax.

The global head (if the layout has one) is just another head here: Ω = every item, every target
is its positive, weighted like any other head (under "frequency" it counts all P_targets).

Cost: the positives' distinct queries (b, t, k) are scored head by head against that head's
candidates only — `[Q_k, |Ω̃_k|]` for the full softmax, `[Q_k, n]` sampled — so logits are computed
once per query, never per positive, and the cost follows Σ_k Q_k |Ω̃_k| (about one head's worth
when each item sits in few groups), not K (N+1) per position. Large full-softmax
blocks are processed in chunks of queries whose logits are recomputed in the backward pass
(activation checkpointing), so the peak stays near one chunk; the sampled rows ([P_k, n], the
target scored beside them) are small and not chunked. Deterministic given `generator` (random draws
happen only for p > 0 or sampled negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from mhr.models.heads import ScoreFn, dot_scores
from mhr.training.sampling import HeadSampler, InBatch, Sampling, head_negatives, sampled_head_lse

HEAD_WEIGHTS = ("frequency", "uniform")
NEGATIVES_FROM = ("group", "global")

# logits (or gathered candidate elements) per chunk before chunking + checkpointing kicks in
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Positives:
    """The P positives, indices and target item ids, all [P]. `find_positives` lists them in
    (k, b, t, j) order — grouped by head, then by query — which lets the loss find each head's
    distinct queries in one linear pass; any other order is accepted (and sorted once)."""

    b: torch.Tensor
    t: torch.Tensor
    j: torch.Tensor
    k: torch.Tensor
    item: torch.Tensor

    def __len__(self) -> int:
        return int(self.k.numel())


def find_positives(targets: torch.Tensor, compat: torch.Tensor) -> Positives:
    """targets [B, L, τ] (0 = none), compat [B, L, τ, K] -> the positives (padding never is one),
    in (k, b, t, j) order."""
    mask = compat & (targets > 0).unsqueeze(-1)
    k, b, t, j = mask.permute(3, 0, 1, 2).nonzero(as_tuple=True)
    return Positives(b, t, j, k, targets.long()[b, t, j])


def candidate_sets(omega: torch.Tensor, negatives_from: str = "group", global_ratio: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The full-softmax candidate sets Ω̃ [K, N+1] (see the module docstring); item 0 never."""
    if negatives_from == "global":
        cand = torch.ones_like(omega, dtype=torch.bool)
    else:
        cand = omega.to(torch.bool).clone()
        if global_ratio > 0:
            draw = torch.rand(omega.shape, generator=generator, device=omega.device, dtype=torch.float64)
            cand |= draw < global_ratio
    cand[:, 0] = False
    return cand


def sample_negatives(omega: torch.Tensor, n: int, negatives_from: str = "group", global_ratio: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Negatives [K, n] (item ids), one sample per head shared by its positives in this batch:
    round(p·n) uniform over items 1..N, the rest uniform over Ω_k (all n over 1..N with
    negatives_from="global"); with replacement. A head with an empty Ω_k gets 0 (never a candidate)."""
    device = omega.device
    n_heads, n_items = omega.shape[0], omega.shape[1] - 1
    n_global = n if negatives_from == "global" else int(round(global_ratio * n))
    n_group = n - n_global
    parts = []
    if n_group:
        om = omega.to(torch.bool).clone()
        om[:, 0] = False
        size = om.sum(1, keepdim=True)  # [K, 1]
        start = torch.cumsum(size, 0) - size
        members = torch.cat([om.nonzero(as_tuple=True)[1], size.new_zeros(1)])  # Ω_k's ids row by row; 0 last
        u = torch.rand(n_heads, n_group, generator=generator, device=device, dtype=torch.float64)
        index = start + (u * size).long().clamp(max=(size - 1).clamp(min=0))
        parts.append(torch.where(size > 0, members[index.clamp(max=len(members) - 1)], 0))
    if n_global:
        u = torch.rand(n_heads, n_global, generator=generator, device=device, dtype=torch.float64)
        parts.append(1 + (u * n_items).long().clamp(max=n_items - 1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def multihead_loss(
    q: torch.Tensor,
    item_vecs: torch.Tensor,
    scorer: ScoreFn,
    targets: torch.Tensor,
    compat: torch.Tensor,
    omega: torch.Tensor,
    *,
    gamma: float = 1.0,
    head_weights: str = "frequency",
    negatives: int | None = None,
    negatives_from: str = "group",
    global_ratio: float = 0.0,
    generator: torch.Generator | None = None,
    hard_negative_beta: float = 0.0,
    negative_ids: torch.Tensor | None = None,
    negatives_per: str = "batch",
    in_batch: bool = False,
    logq: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the module docstring.

    q [B, L, K, d] head queries (or `mhr.models.heads.SelectedQueries`, computed where read); item_vecs [N+1, d]; scorer(q [..., d], items [M, d] or
    [..., M, d]) -> [..., M] (e.g. `mhr.models.heads.Scorer`); targets [B, L, τ] (0 = none);
    compat [B, L, τ, K] (`Compatibility.targets`); omega [K, N+1] (`Compatibility.omega`).
    negative_ids [K, n]: negatives already drawn (`sample_negatives`), used instead of drawing
    them here — for a caller that must know them before computing item_vecs (a fine-tuned item
    LLM encodes only the items the loss reads).
    negatives_per / in_batch / logq: how sampled negatives are shared and corrected
    (`mhr.training.sampling`); the defaults are the original sampler, kept bit for bit.
    Returns (scalar loss, stats): `positives` [K] per-head positive counts, `weights` [K],
    `head_loss` [K] per-head mean cross-entropy (0 where skipped), `heads_used`, `n_positives`.
    """
    if head_weights not in HEAD_WEIGHTS:
        raise ValueError(f"head_weights must be one of {HEAD_WEIGHTS}, got {head_weights!r}")
    if negatives_from not in NEGATIVES_FROM:
        raise ValueError(f"negatives_from must be one of {NEGATIVES_FROM}, got {negatives_from!r}")
    if not 0.0 <= global_ratio <= 1.0:
        raise ValueError(f"global_ratio must be in [0, 1], got {global_ratio}")
    if negatives is not None and negatives < 1:
        raise ValueError(f"negatives must be a positive count or None, got {negatives}")
    if hard_negative_beta and negatives is None and negative_ids is None:
        raise ValueError("hard_negative_beta reweights sampled negatives: it needs negatives=N")
    if negative_ids is not None and (negative_ids.dim() != 2 or negative_ids.shape[0] != q.shape[2]):
        raise ValueError(f"negative_ids must be [K, n] with K = {q.shape[2]}, got {tuple(negative_ids.shape)}")
    if q.dim() != 4 or compat.shape[:3] != targets.shape or compat.shape[3] != q.shape[2]:
        raise ValueError(
            f"shapes disagree: q {tuple(q.shape)}, targets {tuple(targets.shape)}, compat {tuple(compat.shape)}"
        )
    if tuple(omega.shape) != (q.shape[2], item_vecs.shape[0]):
        raise ValueError(f"omega must be [K, N+1] = [{q.shape[2]}, {item_vecs.shape[0]}], got {tuple(omega.shape)}")
    pos = find_positives(targets, compat)
    if negatives is None and negative_ids is None:
        cand = candidate_sets(omega, negatives_from, global_ratio, generator)
        return loss_from_candidates(q, item_vecs, scorer, pos, cand, gamma=gamma, head_weights=head_weights)
    sampling = None
    if negatives is not None:
        sampling = Sampling(negatives, negatives_per, in_batch, logq, negatives_from, global_ratio)
    if sampling is not None and not sampling.is_legacy:
        if negative_ids is not None:
            raise ValueError("negative_ids are one shared draw per batch: they need the legacy sampler")
        return loss_from_sampling(q, item_vecs, pos, sampling, omega, targets, generator, gamma=gamma,
                                  head_weights=head_weights, beta=hard_negative_beta, scorer=scorer)
    if negative_ids is not None:
        negs = negative_ids
    else:
        negs = sample_negatives(omega, negatives, negatives_from, global_ratio, generator)
    return loss_from_negatives(q, item_vecs, scorer, pos, negs, gamma=gamma, head_weights=head_weights,
                               beta=hard_negative_beta)


def loss_from_candidates(q: torch.Tensor, item_vecs: torch.Tensor, scorer: ScoreFn, pos: Positives,
                         cand: torch.Tensor, *, gamma: float = 1.0, head_weights: str = "frequency"):
    """Full-softmax loss given the candidate sets cand [K, N+1] (what `multihead_loss` draws).

    Head by head, each distinct query is scored against that head's candidates only —
    `[Q_k, |Ω̃_k|]`, so the cost follows Σ_k Q_k |Ω̃_k|, not Q (N+1)."""
    cand = cand.to(torch.bool)
    if len(pos):
        present = torch.bincount(pos.k, minlength=cand.shape[0]) > 0
        cand_used = cand & present.unsqueeze(1)  # heads without a positive gather nothing
        size = cand_used.sum(1).tolist()
        # one gather of every head's candidate vectors (its backward: one scatter, not K)
        members = torch.split(item_vecs[cand_used.nonzero(as_tuple=True)[1]], size)

    def head_lse(k: int, queries: torch.Tensor) -> torch.Tensor:
        vecs = members[k]
        return _rows_logsumexp(queries, vecs, scorer)

    return _per_head(q, item_vecs, scorer, pos, head_lse, cand[pos.k, pos.item], gamma, head_weights)


def loss_from_negatives(q: torch.Tensor, item_vecs: torch.Tensor, scorer: ScoreFn, pos: Positives,
                        negs: torch.Tensor, *, gamma: float = 1.0, head_weights: str = "frequency",
                        beta: float = 0.0):
    """Sampled-softmax loss given each head's negatives negs [K, n] (what `multihead_loss` draws).
    Per positive the softmax holds the target and the head's negatives other than it (and 0).

    `beta` > 0: REMI's interest-aware hard negatives — negative i enters the softmax with weight
    w_i = exp(β s_i) / mean_j exp(β s_j) over the positive's kept negatives (s detached), i.e.
    logit s_i + log w_i. β = 0 is the plain sampled softmax."""
    negs = negs.long()

    def head_lse(k: int, queries: torch.Tensor, local: torch.Tensor, target: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        logits = scorer(queries, item_vecs[negs[k]]).float()[local]  # [P_k, n]
        drop = (negs[k] == target.unsqueeze(1)) | (negs[k] == 0)
        if beta:
            tilt = (beta * logits.detach()).masked_fill(drop, float("-inf"))
            kept = (~drop).sum(dim=-1, keepdim=True).clamp(min=1)
            log_w = tilt - (tilt.logsumexp(dim=-1, keepdim=True) - kept.float().log())
            logits = logits + log_w.masked_fill(drop, 0.0)
        return logits.masked_fill(drop, float("-inf")).logsumexp(dim=-1)

    beside = torch.zeros(len(pos), dtype=torch.bool, device=q.device)  # the target joins every softmax
    return _per_head(q, item_vecs, scorer, pos, head_lse, beside, gamma, head_weights, per_positive=True)


def loss_from_sampling(q: torch.Tensor, item_vecs: torch.Tensor, pos: Positives, sampling: Sampling,
                       omega: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None, *,
                       gamma: float = 1.0, head_weights: str = "frequency", beta: float = 0.0,
                       scorer: ScoreFn = dot_scores):
    """Sampled-softmax loss with per-batch / per-sequence / per-position draws, in-batch negatives
    and the logQ correction (`mhr.training.sampling`). Queries and items must be prepared (plain dots)."""
    if scorer is not dot_scores:
        raise ValueError("loss_from_sampling scores with plain dots: prepare queries and items first")
    sampler = HeadSampler(omega, sampling, generator)
    in_batch = InBatch.of(targets) if sampling.in_batch else None
    length = q.shape[1]

    def head_lse(k: int, queries: torch.Tensor, local: torch.Tensor, target: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        neg_ids, rows, neg_offset, batch_ids, batch_offset = head_negatives(
            sampler, k, len(queries), positions, length, in_batch)
        return sampled_head_lse(queries, local, target, rows, neg_ids, item_vecs, neg_offset, batch_ids,
                                batch_offset, beta, table=sampler.table(k))

    beside = torch.zeros(len(pos), dtype=torch.bool, device=q.device)
    return _per_head(q, item_vecs, dot_scores, pos, head_lse, beside, gamma, head_weights, per_positive=True)


def _rows_logsumexp(queries: torch.Tensor, vecs: torch.Tensor, scorer: ScoreFn) -> torch.Tensor:
    """logsumexp over vecs of each query's scores, [Q]; chunked and checkpointed when large, so
    the [Q, M] logits never all live at once (they are recomputed in the backward pass)."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, vecs.shape[0]))
    if len(queries) <= chunk:
        return scorer(queries, vecs).float().logsumexp(dim=-1)
    parts = []
    for s in range(0, len(queries), chunk):
        if torch.is_grad_enabled():
            parts.append(checkpoint(_lse, queries[s : s + chunk], vecs, scorer, use_reentrant=False,
                                    preserve_rng_state=False))
        else:
            parts.append(_lse(queries[s : s + chunk], vecs, scorer))
    return torch.cat(parts)


def _lse(queries: torch.Tensor, vecs: torch.Tensor, scorer: ScoreFn) -> torch.Tensor:
    return scorer(queries, vecs).float().logsumexp(dim=-1)


def _per_head(q, item_vecs, scorer, pos: Positives, head_lse, inside: torch.Tensor, gamma: float,
              head_weights: str, per_positive: bool = False):
    """Per-positive cross-entropies, computed head by head over each head's distinct queries.

    `head_lse(k, queries_k)` -> [Q_k] (or, with per_positive, `head_lse(k, queries_k, local query
    index [P_k], targets [P_k], flat positions b·L + t of the queries [Q_k])` -> [P_k]) is the logsumexp over the head's candidates; `inside`
    [P] says the target is among them (else it joins its own softmax). ce = lse − s(q, y)."""
    batch, length, n_heads, d = q.shape
    if not len(pos):
        return _combine(q, item_vecs, scorer, pos, item_vecs.new_zeros(0), n_heads, gamma, head_weights)
    n_pos = batch * length
    qid = pos.k * n_pos + pos.b * length + pos.t  # (head, position): one query
    order = None
    if len(qid) > 1 and not bool((qid[1:] >= qid[:-1]).all()):
        order = torch.argsort(qid, stable=True)  # not from find_positives: group by query once
        qid = qid[order]
    # distinct queries in one linear pass over the sorted ids (no torch.unique sort)
    first = torch.ones_like(qid, dtype=torch.bool)
    first[1:] = qid[1:] != qid[:-1]
    uniq = qid[first]
    inverse = torch.cumsum(first, 0) - 1  # query of each (sorted) positive
    flat, heads = uniq % n_pos, uniq // n_pos
    if torch.is_tensor(q):
        queries = q.reshape(-1, n_heads, d)[flat, heads]  # [Q, d], grouped by head
    else:  # computed only here, where they are read (`mhr.models.heads.SelectedQueries`)
        queries = q.at(flat, heads)
    q_sizes = torch.bincount(uniq // n_pos, minlength=n_heads).tolist()
    p_sizes = torch.bincount(pos.k, minlength=n_heads).tolist()
    # one split (not K slices): its backward writes the queries' gradient once, not K times
    q_parts = torch.split(queries, q_sizes)
    flat_parts = torch.split(flat, q_sizes)
    items_sorted = pos.item if order is None else pos.item[order]
    inv_parts = torch.split(inverse, p_sizes)
    item_parts = torch.split(items_sorted, p_sizes)
    pieces = []
    q_lo = 0
    for k in range(n_heads):
        if p_sizes[k]:
            local = inv_parts[k] - q_lo
            if per_positive:
                pieces.append(head_lse(k, q_parts[k], local, item_parts[k], flat_parts[k]))
            else:
                pieces.append(head_lse(k, q_parts[k])[local])
        q_lo += q_sizes[k]
    lse = torch.cat(pieces)
    if order is not None:
        lse = torch.empty_like(lse).index_copy_(0, order, lse)
        inverse = torch.empty_like(inverse).index_copy_(0, order, inverse)
    # the target's own score, once per positive: [P, 1, d] x [P, 1, d]
    if scorer is dot_scores:  # plain dots (the trainer's normalised inputs): no [P, 1, d] bmm
        target = (queries[inverse] * item_vecs[pos.item]).sum(-1).float()
    else:
        target = scorer(queries[inverse].unsqueeze(1), item_vecs[pos.item].unsqueeze(1)).reshape(-1).float()
    lse = torch.where(inside, lse, torch.logaddexp(lse, target))
    return _combine(q, item_vecs, scorer, pos, lse - target, n_heads, gamma, head_weights)


def _combine(q, item_vecs, scorer, pos: Positives, ce: torch.Tensor, n_heads: int, gamma: float,
             head_weights: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_j γ^j Σ_k w_k L_{k,j} from the per-positive cross-entropies ce [P]."""
    device = q.device
    counts = torch.bincount(pos.k, minlength=n_heads)  # |Y_k|
    present = counts > 0
    if head_weights == "frequency":
        weights = counts.float() / counts.sum().clamp(min=1)
    else:
        weights = present.float() / present.sum().clamp(min=1)
    if not len(pos):
        # no positive at all: a zero that still reaches every parameter (DDP needs each one used)
        extra = [p.sum() for p in getattr(scorer, "parameters", list)()]
        anchor = q.sum() if torch.is_tensor(q) else q.anchor()
        loss = (anchor + item_vecs.sum() + sum(extra, item_vecs.new_zeros(()))) * 0.0
        head_loss = torch.zeros(n_heads, device=device)
    else:
        discount = torch.pow(torch.tensor(float(gamma), device=device), pos.j.float())
        coef = discount * weights[pos.k] / counts[pos.k].float()
        loss = (coef * ce).sum()
        head_loss = torch.zeros(n_heads, device=device).index_add_(0, pos.k, ce.detach())
        head_loss = head_loss / counts.clamp(min=1)
    stats = {
        "positives": counts.detach(),
        "weights": weights.detach(),
        "head_loss": head_loss,
        "heads_used": present.sum().detach(),
        "n_positives": counts.sum().detach(),
    }
    return loss, stats


def router_loss(logits: torch.Tensor, targets: torch.Tensor, compat: torch.Tensor,
                gamma: float = 1.0) -> torch.Tensor:
    """The joint router's loss: −log Σ_{k compatible with y} p(k | h) for every real target y at
    every position and offset, γ^j-weighted and averaged over those targets.

    logits [B, L, K] (`mhr.models.heads.HeadRouter`), targets [B, L, τ] (0 = none), compat [B, L, τ, K]
    (`Compatibility.targets`). A target no head may take is left out (it has no route)."""
    log_p = torch.log_softmax(logits.float(), dim=-1).unsqueeze(2)  # [B, L, 1, K]
    routed = log_p.masked_fill(~compat, float("-inf")).logsumexp(dim=-1)  # [B, L, τ]
    real = (targets > 0) & compat.any(dim=-1)
    if not bool(real.any()):
        return logits.sum() * 0.0
    discount = torch.pow(torch.tensor(float(gamma), device=logits.device),
                         torch.arange(targets.shape[2], device=logits.device, dtype=torch.float32))
    weight = discount.expand_as(routed)[real]
    return -(routed[real] * weight).sum() / real.sum()
