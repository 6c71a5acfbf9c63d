"""The optimizer: AdamW, or with `--sparse-embeddings` AdamW whose item table is updated lazily.

With a sampled softmax a step reads a few hundred thousand item rows at most, yet a dense item table
gets a dense gradient (zero-filled, clipped) and a dense AdamW update over every row each step, so the
step grows with the catalogue. `--sparse-embeddings` makes the item table's gradient row-sparse (the
input lookup with `nn.Embedding(sparse=True)`, the loss's candidates gathered through `GatheredItems`
instead of indexing the whole normalised table) and `LazyAdamW` updates only the rows a step touched —
`torch.optim.SparseAdam`'s rule: a row's moments decay only on the steps that touch it, and its bias
correction uses the global step. This is a lazy Adam, not dense Adam: an untouched row keeps its
moments and takes no step, where dense Adam would keep moving it on its decaying momentum (and decay
its weights). Decoupled weight decay, when set, applies to the touched rows only. Every other
parameter gets exactly torch's AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


class GatheredItems:
    """The scorer-prepared item table read row by row: `self[ids]` = `prepare(table[ids])` with a
    row-sparse gradient for the table. Stands in for the [N+1, d] tensor the loss indexes (it only
    indexes it), so the normalisation and the gradient cover the rows read, not the catalogue."""

    def __init__(self, table: torch.Tensor, prepare) -> None:
        self.table, self.prepare = table, prepare
        self.shape = table.shape
        self.device, self.dtype = table.device, torch.float32

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        # each distinct row once: normalised once, one row of the sparse gradient (the repeats'
        # gradients are summed densely over the few distinct rows, not coalesced over all reads)
        rows, inverse = _distinct(ids.reshape(-1), self.shape[0])
        vecs = self.prepare(F.embedding(rows, self.table, sparse=True).float())
        return vecs[inverse].reshape(*ids.shape, self.shape[1])

    def sum(self) -> torch.Tensor:
        """A zero-weight use of the table (the loss's anchor when a batch has no positive)."""
        return self[torch.zeros(1, dtype=torch.long, device=self.device)].sum()

    def new_zeros(self, *size) -> torch.Tensor:
        return torch.zeros(*size, dtype=self.dtype, device=self.device)


def _distinct(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct ids in ascending order, each id's index among them) without sorting the ids: a
    pass over an [n] mark (a few MB) instead of a sort of every read (often 10⁵–10⁶ of them)."""
    mark = torch.zeros(n, dtype=torch.bool, device=ids.device)
    mark[ids] = True
    rows = mark.nonzero().squeeze(1)
    slot = torch.empty(n, dtype=torch.long, device=ids.device)
    slot[rows] = torch.arange(len(rows), device=ids.device)
    return rows, slot[ids]


class LazyAdamW(torch.optim.AdamW):
    """torch's AdamW for parameters with dense gradients; rows of a parameter with a sparse gradient
    updated lazily (only the rows in the gradient; `torch.optim.SparseAdam`'s rule, see the module)."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        sparse = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    sparse.append((group, p, p.grad))
                    p.grad = None  # AdamW skips it
        loss = super().step(closure)
        for group, p, grad in sparse:
            p.grad = grad
            self._lazy_step(group, p, grad.coalesce())
        return loss

    def _lazy_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        rows, values = grad.indices()[0], grad.values()
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        m, v = state["exp_avg"][rows], state["exp_avg_sq"][rows]
        m.lerp_(values, 1 - beta1)
        v.mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        update = m / v.sqrt().add_(eps * math.sqrt(1 - beta2**step)) * step_size
        if group["weight_decay"]:
            update += lr * group["weight_decay"] * p[rows]
        p.index_add_(0, rows, update, alpha=-1.0)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` (itself when every gradient is dense), also taking sparse
    gradients: their coalesced values count."""
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = [(g.coalesce().values() if g.is_sparse else g).detach().float().norm() for g in grads]
    if not norms:
        return
    total = torch.stack(norms).norm()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


def sparse_item_table(model: torch.nn.Module) -> torch.nn.Embedding:
    """The backbone's item embedding, switched to sparse gradients (hstu and sasrec have one)."""
    emb = model.backbone.item_embedding
    emb.sparse = True
    return emb


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, sparse_items: bool) -> torch.optim.Optimizer:
    if not sparse_items:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sparse_item_table(model)
    return LazyAdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
