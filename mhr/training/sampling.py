"""Sampled softmax for large catalogues: how negatives are drawn, shared and corrected.

A head's sampled softmax for one positive (query q, target y) runs over y and a candidate multiset
C of negatives; each candidate c enters with logit s(q, c) − log E[copies of c in C] when the logQ
correction is on (so Σ_c exp(s_c) / E[copies] estimates the full in-group partition function), and
with its raw logit when it is off. The target always enters with its raw logit; a candidate equal
to it (an *accidental hit*) is masked, never counted as a negative. C is made of

- `n` uniform draws (with replacement) over the head's group Ω_k (over the whole catalogue with
  `negatives_from="global"`, or round(p·n) of them with `global_ratio=p`), drawn once per batch and
  shared by every positive of the head (`per="batch"`, TensorFlow's sampled softmax), once per
  sequence (`"sequence"`), or once per position (`"position"`, HSTU's reference code);
- with `in_batch=True`, the batch's own targets that lie in Ω_k, each distinct item once with
  multiplicity c_i (how often it is a target in the batch): popular items come in as negatives
  about as often as they are targets (Yi et al., RecSys 2019; mixed with uniform draws as in Yang
  et al., WWW 2020). The expected copies of item i are then E_i = n_k(i) + c_i, with n_k(i) the
  uniform part's expectation (n / |Ω_k| inside the group), which is the mixture's logQ.

The legacy configuration (per batch, no in-batch negatives, no correction) is
`mhr.training.loss.loss_from_negatives`; this module generalises it and is pinned to it by a test.
Memory stays bounded for any n: the [queries × n] logits — and for per-sequence/per-position draws
the [queries × n × d] gathered vectors — are processed in chunks of queries whose logits are
recomputed in the backward pass (activation checkpointing), as the full softmax does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

NEGATIVES_PER = ("batch", "sequence", "position")
# elements (logits or gathered vector entries) per chunk before chunking + checkpointing kicks in
CHUNK_ELEMENTS = 1 << 24
# per-sequence / per-position draws over a table of at most DENSE_FACTOR · n items score the whole
# table with one matmul and pick each row's n columns; larger tables gather [rows, n, d] vectors
# (memory-bound, with a slow scatter in backward: ~8x slower at 1.7k items, par at ~12k)
DENSE_FACTOR = 64
# a draw read by at least this many queries on average (draws per sequence) is gathered once per
# draw and scored with a batched matmul, not gathered once per query
SHARED_QUERIES = 4


@dataclass(frozen=True)
class Sampling:
    """How a sampled softmax draws its negatives (see the module docstring)."""

    n: int
    per: str = "batch"
    in_batch: bool = False
    logq: bool = False
    negatives_from: str = "group"
    global_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.per not in NEGATIVES_PER:
            raise ValueError(f"per must be one of {NEGATIVES_PER}, got {self.per!r}")
        if self.n < 1:
            raise ValueError(f"n must be a positive count, got {self.n}")

    @property
    def is_legacy(self) -> bool:
        """The original sampler (one shared draw per batch, uncorrected): kept bit for bit."""
        return self.per == "batch" and not self.in_batch and not self.logq

    def split(self) -> tuple[int, int]:
        """(draws inside the group, draws over the whole catalogue)."""
        n_global = self.n if self.negatives_from == "global" else int(round(self.global_ratio * self.n))
        return self.n - n_global, n_global


class HeadSampler:
    """Per-step draws for every head; `draw(k, rows)` -> item ids [rows, n] (0 = none)."""

    def __init__(self, omega: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> None:
        om = omega.to(torch.bool).clone()
        om[:, 0] = False
        self.omega = om
        self.sampling = sampling
        self.generator = generator
        self.n_items = omega.shape[1] - 1
        self.size = om.sum(1)  # |Ω_k|
        self._members: dict[int, torch.Tensor] = {}

    def members(self, k: int) -> torch.Tensor:
        if k not in self._members:
            self._members[k] = self.omega[k].nonzero(as_tuple=True)[0]
        return self._members[k]

    def table(self, k: int) -> torch.Tensor:
        """The sorted ids one head's draws are uniform over — its group, or the whole catalogue —
        or an empty tensor when they mix the two (`global_ratio`)."""
        n_group, n_global = self.sampling.split()
        if not n_global:
            return self.members(k)
        if not n_group:
            return torch.arange(1, self.n_items + 1, device=self.omega.device)
        return self.omega.new_zeros(0, dtype=torch.long)

    def draw(self, k: int, rows: int) -> torch.Tensor:
        n_group, n_global = self.sampling.split()
        device = self.omega.device
        parts = []
        if n_group:
            members = self.members(k)
            if len(members):
                idx = torch.randint(0, len(members), (rows, n_group), generator=self.generator, device=device)
                parts.append(members[idx])
            else:
                parts.append(torch.zeros(rows, n_group, dtype=torch.long, device=device))
        if n_global:
            parts.append(torch.randint(1, self.n_items + 1, (rows, n_global), generator=self.generator,
                                       device=device))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def uniform_expectation(self, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Expected copies of each item among one draw of the uniform part, same shape as ids."""
        n_group, n_global = self.sampling.split()
        inside = self.omega[k][ids].to(torch.float32)
        group = n_group / max(1, int(self.size[k])) if n_group else 0.0
        return inside * group + n_global / self.n_items


@dataclass
class InBatch:
    """The batch's distinct target items and how often each is a target: ids [m], counts [m]."""

    ids: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, targets: torch.Tensor) -> InBatch:
        flat = targets.reshape(-1).long()
        ids, counts = torch.unique(flat[flat > 0], return_counts=True)
        return cls(ids, counts.to(torch.float32))


def sampled_head_lse(
    queries: torch.Tensor,
    local: torch.Tensor,
    target: torch.Tensor,
    rows: torch.Tensor | None,
    neg_ids: torch.Tensor,
    item_vecs: torch.Tensor,
    neg_offset: torch.Tensor | None = None,
    batch_ids: torch.Tensor | None = None,
    batch_offset: torch.Tensor | None = None,
    beta: float = 0.0,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """logsumexp over each positive's negatives (accidental hits masked), [P].

    queries [Q, d] (prepared: plain dots), local [P] the query of each positive (ascending),
    target [P] item ids; neg_ids [R, n] with rows [Q] the draw each query reads (None: R = 1,
    shared by all); neg_offset [R, n] added to the logits (the logQ correction) or None;
    batch_ids [m] / batch_offset [m]: in-batch candidates shared by all queries (or None);
    beta > 0: REMI's hard-negative tilt of the uniform part (see `mhr.training.loss.loss_from_negatives`).
    table [M]: the sorted ids the draws are uniform over (`HeadSampler.table`); when small enough,
    each query scores the whole table and takes its draws' columns (same values, far cheaper).
    """
    n = neg_ids.shape[1]
    d = queries.shape[1]
    m = 0 if batch_ids is None else len(batch_ids)
    dense = rows is not None and table is not None and 0 < len(table) <= DENSE_FACTOR * n
    # draws read by many queries each (per sequence): each draw's vectors are gathered once
    shared = rows is not None and not dense and len(neg_ids) * SHARED_QUERIES <= len(queries)
    if dense:
        per_row = len(table) + n + m
        columns = torch.searchsorted(table, neg_ids).clamp(max=len(table) - 1)  # [R, n] into the table
        vecs_in = item_vecs[table]
    else:
        per_row = (2 * n if shared else n * d if rows is not None else n) + m
        columns, vecs_in = None, (item_vecs if rows is not None else None)
    chunk = max(1, CHUNK_ELEMENTS // max(1, per_row + n))
    bounds = list(range(0, len(queries), chunk)) + [len(queries)]
    cuts = torch.searchsorted(local, torch.tensor(bounds, device=local.device)).tolist()
    shared_vecs = item_vecs[neg_ids[0]] if rows is None else None
    batch_vecs = item_vecs[batch_ids] if m else None
    parts = []
    for c in range(len(bounds) - 1):
        lo, hi = bounds[c], bounds[c + 1]
        p_lo, p_hi = cuts[c], cuts[c + 1]
        if p_lo == p_hi:
            continue
        args = (
            queries[lo:hi], local[p_lo:p_hi] - lo, target[p_lo:p_hi],
            None if rows is None else rows[lo:hi], neg_ids,
            vecs_in if rows is not None else shared_vecs, neg_offset, batch_ids, batch_vecs, batch_offset,
        )
        if len(bounds) > 2 and torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_lse, *args, beta, columns, shared, use_reentrant=False,
                                    preserve_rng_state=False))
        else:
            parts.append(_chunk_lse(*args, beta, columns, shared))
    return torch.cat(parts) if parts else queries.new_zeros(0)


def _chunk_lse(queries, local, target, rows, neg_ids, vecs, neg_offset, batch_ids, batch_vecs, batch_offset,
               beta: float, columns: torch.Tensor | None = None, shared: bool = False) -> torch.Tensor:
    if rows is None:  # one draw shared by every query: a plain [C, n] matmul
        logits = (queries @ vecs.transpose(0, 1)).float()[local]  # [P, n]
        ids = neg_ids[0].expand(len(local), -1)
        offset = None if neg_offset is None else neg_offset[0].expand(len(local), -1)
    else:  # a draw per sequence / position, scored per query, then read per positive
        if columns is not None:  # the whole (small) table with one matmul, then each row's columns
            per_query = (queries @ vecs.transpose(0, 1)).float().gather(1, columns[rows])  # [C, n]
        elif shared:  # each draw's [n, d] vectors once, its queries padded into one batched matmul
            per_query = _shared_draw_logits(queries, rows, neg_ids, vecs)
        else:  # [C, n, d] gathered vectors (the reference the shared path is tested against)
            per_query = torch.einsum("cd,cnd->cn", queries, vecs[neg_ids[rows]]).float()
        logits = per_query[local]  # [P, n]
        r = rows[local]
        ids = neg_ids[r]
        offset = None if neg_offset is None else neg_offset[r]
    drop = (ids == target.unsqueeze(1)) | (ids == 0)
    if beta:
        tilt = (beta * logits.detach()).masked_fill(drop, float("-inf"))
        kept = (~drop).sum(dim=-1, keepdim=True).clamp(min=1)
        log_w = tilt - (tilt.logsumexp(dim=-1, keepdim=True) - kept.float().log())
        logits = logits + log_w.masked_fill(drop, 0.0)
    if offset is not None:
        logits = logits + offset
    lse = logits.masked_fill(drop, float("-inf")).logsumexp(dim=-1)
    if batch_ids is not None and len(batch_ids):
        inb = (queries @ batch_vecs.transpose(0, 1)).float()[local]  # [P, m]
        if batch_offset is not None:
            inb = inb + batch_offset
        inb = inb.masked_fill(batch_ids == target.unsqueeze(1), float("-inf"))
        lse = torch.logaddexp(lse, inb.logsumexp(dim=-1))
    return lse


def _shared_draw_logits(queries: torch.Tensor, rows: torch.Tensor, neg_ids: torch.Tensor, vecs) -> torch.Tensor:
    """[C, n] logits of each query against its draw's negatives, `neg_ids[rows]`, with each draw
    read once: [R', n, d] vectors for the R' draws of the chunk instead of [C, n, d]."""
    draws, j = torch.unique(rows, return_inverse=True)
    counts = torch.bincount(j, minlength=len(draws))
    order = torch.argsort(j, stable=True)
    slot = torch.empty_like(j)
    slot[order] = torch.arange(len(j), device=j.device) - (torch.cumsum(counts, 0) - counts)[j[order]]
    padded = queries.new_zeros(len(draws), int(counts.max()), queries.shape[1])
    padded = padded.index_put((j, slot), queries)
    return torch.bmm(padded, vecs[neg_ids[draws]].transpose(1, 2))[j, slot].float()


def head_negatives(sampler: HeadSampler, k: int, n_queries: int, positions: torch.Tensor, length: int,
                   in_batch: InBatch | None):
    """One head's draw and corrections for its Q queries at flat positions [Q] (b·L + t):
    (neg_ids [R, n], rows [Q] or None, neg_offset or None, batch_ids or None, batch_offset or None)."""
    s = sampler.sampling
    if s.per == "batch":
        neg_ids, rows = sampler.draw(k, 1), None
    elif s.per == "sequence":
        b = torch.div(positions, length, rounding_mode="floor")
        seqs, rows = torch.unique(b, return_inverse=True)
        neg_ids = sampler.draw(k, len(seqs))
    else:
        neg_ids, rows = sampler.draw(k, n_queries), torch.arange(n_queries, device=positions.device)
    batch_ids = batch_counts = None
    if s.in_batch and in_batch is not None:
        keep = sampler.omega[k][in_batch.ids] if s.negatives_from == "group" else in_batch.ids > 0
        batch_ids, batch_counts = in_batch.ids[keep], in_batch.counts[keep]
    neg_offset = batch_offset = None
    if s.logq:
        copies = sampler.uniform_expectation(k, neg_ids)
        if batch_ids is not None:
            copies = copies + _counts_of(neg_ids, batch_ids, batch_counts)
            batch_offset = -(batch_counts + sampler.uniform_expectation(k, batch_ids)).log()
        neg_offset = -copies.clamp(min=1e-12).log()
    return neg_ids, rows, neg_offset, batch_ids, batch_offset


def _counts_of(ids: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """counts of each id in `sorted_ids` (0 where absent), same shape as ids."""
    if not len(sorted_ids):
        return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    pos = torch.searchsorted(sorted_ids, ids).clamp(max=len(sorted_ids) - 1)
    return torch.where(sorted_ids[pos] == ids, counts[pos], 0.0)

