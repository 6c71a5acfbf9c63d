"""One training step: which windows it trains on (`batch_rows`, a function of (seed, step) only, so a
resumed run recomputes it), their tensors (`make_batch`) and the forward pass, model + loss as one
module (`LossStep`).

The training loop wraps `LossStep` in DistributedDataParallel under torchrun; the benchmarks time it
and the tests drive it directly.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from mhr.models.heads import Compatibility, PriorHeads, SelectedQueries, dot_scores
from mhr.models.multihead import MultiHeadRecommender
from mhr.training.loss import multihead_loss, router_loss, sample_negatives
from mhr.training.optim import GatheredItems
from mhr.training.params import TrainParams
from mhr.windows import horizon_targets

__all__ = ["LossStep", "batch_rows", "epoch_order", "make_batch"]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The batch order of one epoch: a function of (seed, epoch) only, so resume can recompute it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(seed: int, step: int, batch_size: int, n_windows: int) -> np.ndarray:
    """The windows (indices over all of them) of the global batch of `step`."""
    epoch, offset = divmod(step, math.ceil(n_windows / batch_size))
    return epoch_order(seed, epoch, n_windows)[offset * batch_size : (offset + 1) * batch_size]


def make_batch(train: dict[str, np.ndarray], rows: np.ndarray, context: int, horizon: int, device) -> dict:
    """The tensors of one batch: the windows `rows` of `train` (`WindowsRef.read_split("train")`) cut to
    T input positions, each with its next τ targets and their events (0 = none), and the users."""
    items = train["items"][rows]
    events = train["events"][rows]
    tgt = horizon_targets(items, horizon)[:, :context]
    tgt_ev = horizon_targets(events.astype(np.int64), horizon)[:, :context]
    # a target beyond the window's real length is padding (item 0) in `tgt`; its event is 0 too
    tgt_ev = np.where(tgt > 0, tgt_ev, 0)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return {
        "items": to(items[:, :context]),
        "ts": to(train["ts"][rows][:, :context]),
        "targets": to(tgt),
        "target_events": to(tgt_ev),
        "users": to(train["user"][rows].astype(np.int64)),
    }


class LossStep(torch.nn.Module):
    """Model + loss as one module, so DistributedDataParallel sees every parameter that the loss
    touches (the scorer's temperature and the scoring item table included) inside forward."""

    def __init__(self, model: MultiHeadRecommender, compat: Compatibility, params: TrainParams,
                 gen: torch.Generator, omega: torch.Tensor, selective: bool = True) -> None:
        super().__init__()
        self.model = model
        self.compat = compat
        self.params = params
        self.gen = gen
        self.omega = omega
        # the prior heads decode state by state, so only the queries the loss reads are computed;
        # `selective=False` keeps the dense reference (every head at every position)
        self.selective = selective and isinstance(model.heads, PriorHeads)

    def forward(self, items, ts, targets, target_events, users):
        p = self.params
        negs, step = None, nullcontext()
        if getattr(self.model.backbone, "trains_item_llm", False):
            # a fine-tuned item LLM encodes only this step's items, once: the inputs, the targets and
            # the negatives, drawn first (from the same generator, so runs stay resumable)
            negs = sample_negatives(self.omega, p.negatives, p.negatives_from, p.global_ratio, self.gen)
            step = self.model.backbone.encoding(torch.unique(torch.cat([items.flatten(), targets.flatten(),
                                                                        negs.flatten()])))
        with step:
            scorer = self.model.scorer
            h = self.model.backbone(items, ts)
            if self.selective:  # prior heads: each query computed only where the loss reads it
                h = h.float()
                q, aux = SelectedQueries(self.model.heads, h, scorer.prepare_queries), {}
            else:
                q, aux = self.model.heads.decode(h, items != 0)
                q = q.float()
            item_vecs = self.model.item_vectors().float()
            omega = self.omega
            own = self.model.heads.eligibility(item_vecs)  # DualVAE: each item's own aspect
            if own is not None:
                omega = omega & own
            compat_t = self.compat.targets(targets, target_events, users)
            compat_t = self.model.heads.assign(q, item_vecs, scorer, targets, compat_t)
            # normalised once, then plain dot products inside the loss
            if p.sparse_embeddings:  # only the rows the loss reads, with a row-sparse gradient
                item_vecs = GatheredItems(self.model.item_vectors(), scorer.prepare_items)
                q = q if self.selective else scorer.prepare_queries(q)
            elif self.selective:
                item_vecs = scorer.prepare_items(item_vecs)
            else:
                q, item_vecs = scorer.prepare(q, item_vecs)
            loss, stats = multihead_loss(
                q,
                item_vecs,
                dot_scores,
                targets,
                compat_t,
                omega,
                gamma=p.gamma,
                head_weights=p.head_weights,
                negatives=p.negatives,
                negatives_from=p.negatives_from,
                global_ratio=p.global_ratio,
                generator=self.gen,
                hard_negative_beta=p.beta,
                negative_ids=negs,
                negatives_per=p.negatives_per,
                in_batch=p.in_batch_negatives,
                logq=p.logq,
            )
        if self.model.router is not None:  # p(k | h), trained jointly with the heads
            route = router_loss(self.model.router(h.float()), targets, compat_t, p.gamma)
            loss = loss + p.router_weight * route
            stats["router"] = route.detach()
        if self.selective:  # heads without a positive in this batch still count as used (DDP)
            loss = loss + q.anchor()
        for term, value in aux.items():  # the decoder's regularisers (REMI's routing, DualVAE's KL)
            loss = loss + value.float()
            stats[term] = value.detach()
        return loss, stats
