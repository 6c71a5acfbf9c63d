"""Prior-conditioned heads: layout, adapters, scorer and compatibility sets.

The method (Zhang et al. 2025, arXiv 2511.10492; docs/ARCHITECTURE.md, "The method in brief"):

- A head decodes the backbone state `h` into a query `q_k = h + SiLU(W_k h + b_k)` (Eq. 2), `W_k`
  and `b_k` zero-initialised, so at step 0 every head *is* `h`. The released code left the bias
  at PyTorch's default init (and HSTU re-initialised the head weights); here both start at zero.
- Head `k` only scores items in `Ω_k` (Eq. 3).
- Several priors compose (Eq. 4–5): *additive* (independent heads per (prior, group)),
  *multiplicative* (one independent head per element of the Cartesian product) or *hierarchical*
  (a tree, one level per prior, in the order the priors are given):
  `z⁽⁰⁾ = h`, `z⁽ˡ⁾ = z⁽ˡ⁻¹⁾ + SiLU(W_path z⁽ˡ⁻¹⁾ + b_path) + e_(ℓ, g)` with one adapter per tree node
  (path prefix) and one group embedding per (level, group) shared by every branch through that
  group; the leaves are the heads. The paper's Eq. 4 has no bias inside the SiLU; we keep the
  zero-initialised bias of Eq. 2 there too, so every adapter is the same residual SiLU layer.
- A leaf's `Ω_k` is the intersection of its item-restricting levels (item, graph); event,
  temporal and user levels allow every item (the table in docs/ARCHITECTURE.md, "Prior kinds and
  compatibility"). Leaves whose intersection is empty are dropped by default and listed in
  `HeadLayout.dropped`.
- The optional *global head* is the backbone's own state `h` (no parameters) over the whole
  catalogue, with every target as a positive; it is always the last head.
- Inference fuses each item's eligible heads by max (the winner explains) or by average
  (`mhr.ranking.fusion`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mhr.errors import StaleError, UsageError
from mhr.priors.kinds import EVENTS, HORIZON, ITEMS, USERS
from mhr.priors.spec import PriorSpec

COMPOSITIONS = ("flat", "additive", "multiplicative", "hierarchical")
SCORES = ("cosine", "dot")
GLOBAL = "global"

# what `Scorer` and `dot_scores` are: (queries [..., d], items [M, d] or [..., M, d]) -> scores [..., M]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class HeadLayout:
    """Which heads exist. Each leaf is `((prior index, group id), ...)`, one pair per level it
    constrains (one pair for flat/additive, one per prior for multiplicative/hierarchical).
    The global head, when present, has no pairs and comes last; `names[k]` names head `k`."""

    priors: tuple[PriorSpec, ...]
    compose: str
    global_head: bool
    leaves: tuple[tuple[tuple[int, int], ...], ...]
    names: tuple[str, ...]
    dropped: tuple[str, ...] = ()  # leaves left out because their item sets do not intersect

    @property
    def n_heads(self) -> int:
        return len(self.leaves) + int(self.global_head)

    def describe(self, d: int | None = None) -> str:
        """One line for logs: composition, priors, head count, dropped leaves, parameters."""
        over = " × ".join(s.name for s in self.priors) or "no priors"
        text = f"{self.compose} over {over}: {self.n_heads} heads"
        if self.global_head and self.leaves:
            text += " (incl. global)"
        if self.dropped:
            text += f", {len(self.dropped)} empty leaves dropped"
        if d is not None:
            text += f", {parameter_count(self, d):,} head parameters at d={d}"
        return text


def build_layout(
    priors: tuple[PriorSpec, ...] | list[PriorSpec],
    compose: str,
    global_head: bool = False,
    drop_empty: bool = True,
) -> HeadLayout:
    """The heads for `priors` composed by `compose`.

    No priors: one "global" head (the plain backbone), whatever `compose` says. `flat` takes
    exactly one prior. Multiplicative and hierarchical leaves are the Cartesian product of the
    priors' groups, first prior outermost (tree order = order given). With `drop_empty`, leaves
    whose item-restricting sets do not intersect (and item groups with no item) are dropped and
    their names kept in `dropped`.
    """
    priors = tuple(priors)
    if compose not in COMPOSITIONS:
        raise UsageError(f"unknown composition {compose!r}", hint=f"use one of {', '.join(COMPOSITIONS)}")
    if not priors:
        return HeadLayout((), compose, True, (), (GLOBAL,))
    if compose == "flat" and len(priors) != 1:
        raise UsageError(
            f"--compose flat takes exactly one prior, got {len(priors)}",
            hint="use additive, multiplicative or hierarchical for several priors",
        )
    for spec in priors:
        if spec.n_groups == 0:
            raise UsageError(f"prior {spec.name!r} has no groups", hint="rebuild it with `mhr priors build`")
    if compose in ("flat", "additive"):
        candidates = [((p, g),) for p, spec in enumerate(priors) for g in range(spec.n_groups)]
    else:
        candidates = [
            tuple(enumerate(groups)) for groups in itertools.product(*(range(s.n_groups) for s in priors))
        ]
    names = _leaf_names(priors, candidates)
    leaves, kept, dropped = [], [], []
    for leaf, name in zip(candidates, names, strict=True):
        if drop_empty and not _item_set(priors, leaf).any():
            dropped.append(name)
        else:
            leaves.append(leaf)
            kept.append(name)
    if not leaves and not global_head:
        raise UsageError(
            f"every {compose} head over {', '.join(s.name for s in priors)} has an empty item set",
            hint="check the priors' item groups (`mhr priors show`) or add --global-head",
        )
    if global_head:
        kept.append(GLOBAL)
    return HeadLayout(priors, compose, global_head, tuple(leaves), tuple(kept), tuple(dropped))


def _leaf_names(priors: tuple[PriorSpec, ...], leaves: list[tuple[tuple[int, int], ...]]) -> list[str]:
    """"ST · Comedy"; qualified as "temporal:ST · item:Comedy" if plain names would collide."""
    plain = [" · ".join(priors[p].group_names[g] for p, g in leaf) for leaf in leaves]
    if len(set(plain)) == len(plain) and GLOBAL not in plain:
        return plain
    return [" · ".join(f"{priors[p].name}:{priors[p].group_names[g]}" for p, g in leaf) for leaf in leaves]


def _item_set(priors: tuple[PriorSpec, ...], leaf: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Bool [n+1] intersection of the leaf's item-restricting groups (all True if none restrict)."""
    sets = [priors[p].item_groups[g] for p, g in leaf if priors[p].restricts_items]
    if not sets:
        return np.ones(1, dtype=bool)
    n = min(len(s) for s in sets)
    out = np.ones(n, dtype=bool)
    for s in sets:
        out &= s[:n]
    out[0] = False
    return out


def tree_levels(leaves: tuple[tuple[tuple[int, int], ...], ...]) -> list[tuple[list[int], list[int]]]:
    """The hierarchical tree: per level, each node's (parent index, group id).

    Nodes of level ℓ are the distinct length-ℓ prefixes of the leaves, in first-seen order, so the
    last level lists exactly the leaves in layout order. The root (level 0) is node 0.
    """
    if not leaves:
        return []
    levels = []
    prev: dict[tuple, int] = {(): 0}
    for depth in range(1, len(leaves[0]) + 1):
        index: dict[tuple, int] = {}
        parents, groups = [], []
        for leaf in leaves:
            prefix = leaf[:depth]
            if prefix not in index:
                index[prefix] = len(index)
                parents.append(prev[prefix[:-1]])
                groups.append(prefix[-1][1])
        levels.append((parents, groups))
        prev = index
    return levels


def parameter_count(layout: HeadLayout, d: int) -> int:
    """Parameters of `PriorHeads(d, layout)`: d² + d per adapter, plus d per group embedding."""
    if not layout.leaves:
        return 0
    if layout.compose != "hierarchical":
        return len(layout.leaves) * (d * d + d)
    nodes = sum(len(parents) for parents, _ in tree_levels(layout.leaves))
    groups = sum(spec.n_groups for spec in layout.priors)
    return nodes * (d * d + d) + groups * d


# ---------------------------------------------------------------------------------------------
# heads


class PriorHeads(nn.Module):
    """h [..., d] -> head queries q [..., K, d]; every head equals h at initialisation.

    flat / additive / multiplicative: `weight [K', d, d]`, `bias [K', d]` (K' leaves), all heads
    in one matmul. hierarchical: per level ℓ, adapters `weight_ℓ [n_ℓ, d, d]`, `bias_ℓ [n_ℓ, d]`
    (one per tree node) and group embeddings `group_ℓ [G_ℓ, d]`; computed level by level, each
    level one batched matmul over its nodes' parents gathered from the level above.
    """

    sequence_level = False  # decodes each state on its own (`mhr.models.multihead` decoder contract)

    def __init__(self, d: int, layout: HeadLayout) -> None:
        super().__init__()
        self.d = d
        self.layout = layout
        self.n_leaves = len(layout.leaves)
        self.hierarchical = layout.compose == "hierarchical" and self.n_leaves > 0
        if self.hierarchical:
            self.weights = nn.ParameterList()
            self.biases = nn.ParameterList()
            self.groups = nn.ParameterList()
            for level, (parents, groups) in enumerate(tree_levels(layout.leaves)):
                n = len(parents)
                self.weights.append(nn.Parameter(torch.zeros(n, d, d)))
                self.biases.append(nn.Parameter(torch.zeros(n, d)))
                self.groups.append(nn.Parameter(torch.zeros(layout.priors[level].n_groups, d)))
                self.register_buffer(f"parent_{level}", torch.tensor(parents, dtype=torch.long), persistent=False)
                self.register_buffer(f"group_{level}", torch.tensor(groups, dtype=torch.long), persistent=False)
            self.depth = len(self.weights)
        elif self.n_leaves:
            self.weight = nn.Parameter(torch.zeros(self.n_leaves, d, d))  # [K', d_out, d_in]
            self.bias = nn.Parameter(torch.zeros(self.n_leaves, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead, d = h.shape[:-1], h.shape[-1]
        x = h.reshape(-1, d)
        parts = []
        if self.hierarchical:
            parts.append(self._tree(x))
        elif self.n_leaves:
            a = (x @ self.weight.reshape(-1, d).t()).view(-1, self.n_leaves, d) + self.bias
            parts.append(x.unsqueeze(1) + F.silu(a))
        if self.layout.global_head:
            parts.append(x.unsqueeze(1))
        q = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return q.view(*lead, self.layout.n_heads, d)

    def decode(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(queries, no auxiliary loss): the decoder contract of `mhr.models.multihead`."""
        return self(h), {}

    def assign(self, q, item_vecs, scorer, targets: torch.Tensor, compat: torch.Tensor) -> torch.Tensor:
        """Which head each target trains: exactly the prior's compatibility (`Compatibility.targets`)."""
        return compat

    def eligibility(self, item_vecs: torch.Tensor) -> None:
        """None: the items a head scores are the layout's fixed Ω_k (`Compatibility.omega`)."""
        return None

    def queries_at(self, h: torch.Tensor, pos: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """`forward(h)[pos, head]` for the requested (position, head) pairs only: [Q, d].

        h [M, d]; pos, head [Q] (fastest when grouped by head, as the loss asks for them). The
        leaf adapters run only at the positions where their head is asked for — in training, where
        the head has a positive — so the cost of the last tree level follows the positives, not
        M × K; the levels above it are computed densely (few nodes). Same values as
        `forward`; `tests/test_heads.py` holds the two together.
        """
        d = h.shape[-1]
        sizes = torch.bincount(head, minlength=self.layout.n_heads).tolist()
        order = None
        if len(head) > 1 and not bool((head[1:] >= head[:-1]).all()):
            order = torch.argsort(head, stable=True)
            pos, head = pos[order], head[order]
        if self.hierarchical:
            z = self._tree(h, self.depth - 1)  # [M, n_(L-1), d]: every node above the leaves
            last = self.depth - 1
            weight, bias = self.weights[last], self.biases[last]
            parent = getattr(self, f"parent_{last}")
            group = self.groups[last].index_select(0, getattr(self, f"group_{last}"))
        elif self.n_leaves:
            z, weight, bias = h.unsqueeze(1), self.weight, self.bias
            parent = torch.zeros(self.n_leaves, dtype=torch.long, device=h.device)
            group = None
        parts = []
        n_leaf_queries = sum(sizes[: self.n_leaves])
        if n_leaf_queries:  # one gather of every leaf's input (its backward: one scatter, not K)
            inputs = torch.split(z[pos[:n_leaf_queries], parent[head[:n_leaf_queries]]], sizes[: self.n_leaves])
        for k, rows in enumerate(torch.split(pos, sizes)):
            if not len(rows):
                continue
            if k == self.n_leaves:  # the global head: h itself
                parts.append(h[rows])
                continue
            x = inputs[k]  # [Q_k, d]
            out = x + F.silu(x @ weight[k].t() + bias[k])
            parts.append(out if group is None else out + group[k])
        q = torch.cat(parts) if parts else h.new_zeros(0, d)
        if order is not None:
            q = torch.empty_like(q).index_copy_(0, order, q)
        return q

    def _tree(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """x [M, d] -> leaves [M, K', d] (Eq. 4–5); with `depth`, the nodes of that level instead."""
        z = x.unsqueeze(1)  # [M, 1, d]: the root
        for level in range(self.depth if depth is None else depth):
            parent = z.index_select(1, getattr(self, f"parent_{level}"))  # [M, n, d]
            a = torch.einsum("mnd,ned->mne", parent, self.weights[level]) + self.biases[level]
            z = parent + F.silu(a) + self.groups[level].index_select(0, getattr(self, f"group_{level}"))
        return z

    def extra_repr(self) -> str:
        return f"d={self.d}, {self.layout.describe()}"


class HeadRouter(nn.Module):
    """p(k | h): a distribution over the layout's heads from the backbone state, trained jointly
    with the heads (`mhr.training.loss.router_loss`: −log Σ_{k compatible with the target} p(k | h)).

    With it a head's in-group softmax becomes a factor of one model over the catalogue,
    p(i | h) = Σ_k p(k | h) p(i | k, h) with p(i | k, h) = softmax over Ω_k of s_k — exactly
    that for a partition prior — and items are ranked by max_k log p(k | h) + log p(i | k, h)
    (`mhr.ranking.fusion.router_offsets`). Zero-initialised: every head starts equally likely.
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, n_heads)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] -> router logits [..., K]."""
        return self.proj(h)


class SelectedQueries:
    """Head queries of a batch, computed only where the loss reads them (`PriorHeads.queries_at`).

    Stands in for the dense q [B, L, K, d] in `mhr.training.loss.multihead_loss`: `shape`, `device`, and
    `at(flat position, head)` -> [Q, d] (then `transform`, e.g. the scorer's normalisation).
    `anchor()` is a zero that reaches every head parameter, for when no query is read (and so that
    DistributedDataParallel always sees every parameter used)."""

    def __init__(self, heads: PriorHeads, h: torch.Tensor, transform=None) -> None:
        self.heads, self.transform = heads, transform
        batch, length, d = h.shape
        self.h = h.reshape(-1, d)
        self.shape = torch.Size((batch, length, heads.layout.n_heads, d))
        self.device = h.device

    def dim(self) -> int:
        return 4

    def at(self, flat: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        q = self.heads.queries_at(self.h, flat, head)
        return q if self.transform is None else self.transform(q)

    def anchor(self) -> torch.Tensor:
        return sum((p.sum() for p in self.heads.parameters()), self.h.sum()) * 0.0


# ---------------------------------------------------------------------------------------------
# scorer


class Scorer(nn.Module):
    """Query-item scores `[..., M]` from queries `[..., d]` and items `[M, d]` (or `[..., M, d]`).

    cosine: `cos(q, e) / T` with ONE temperature shared by every head, learnable by default (stored
    as log(1/T), clamped to T ∈ [MIN_T, MAX_T]) — a shared scale is what keeps scores of different
    heads comparable under max fusion. dot: the plain dot product (no parameters).
    """

    MIN_T, MAX_T = 1e-3, 10.0

    def __init__(self, mode: str = "cosine", init_temperature: float = 0.05, learn_temperature: bool = True) -> None:
        super().__init__()
        if mode not in SCORES:
            raise UsageError(f"unknown score {mode!r}", hint=f"use one of {', '.join(SCORES)}")
        self.mode = mode
        if mode == "cosine":
            if not self.MIN_T <= init_temperature <= self.MAX_T:
                raise UsageError(
                    f"temperature {init_temperature} is out of range",
                    hint=f"use a value in [{self.MIN_T}, {self.MAX_T}] (0.05 is usual)",
                )
            log_scale = torch.tensor(math.log(1.0 / init_temperature))
            if learn_temperature:
                self.log_scale = nn.Parameter(log_scale)
            else:
                self.register_buffer("log_scale", log_scale)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(math.log(1 / self.MAX_T), math.log(1 / self.MIN_T)).exp()

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.scale().detach()) if self.mode == "cosine" else 1.0

    def prepare(self, q: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q', items') with `self(q, items) == dot_scores(q', items')`: for the loss, which then
        normalises every query and item once instead of once per head and per positive."""
        return self.prepare_queries(q), self.prepare_items(items)

    def prepare_queries(self, q: torch.Tensor) -> torch.Tensor:
        # the scale goes on the [..., d] queries, not on the [..., M] scores: one pass fewer over M
        return q if self.mode == "dot" else F.normalize(q, dim=-1) * self.scale()

    def prepare_items(self, items: torch.Tensor) -> torch.Tensor:
        return items if self.mode == "dot" else F.normalize(items, dim=-1)

    def forward(self, q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return dot_scores(*self.prepare(q, items))

    def extra_repr(self) -> str:
        return f"mode={self.mode}" + (f", temperature={self.temperature:.4g}" if self.mode == "cosine" else "")


def dot_scores(q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """q [..., d] · items [M, d] (or [..., M, d]) -> [..., M]."""
    return q @ items.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# compatibility


class Compatibility:
    """The sets that say which items a head scores and which targets train it (the table in
    docs/ARCHITECTURE.md, "Prior kinds and compatibility").

    `omega [K, N+1]`: Ω_k, the intersection of the leaf's item-restricting groups (item, graph);
    event/temporal/user levels allow every item; the global head allows every item; item 0 never.
    `event_vocab` decodes the windows' event codes: code 0 is NULL (the prior's `None` key), code
    i ≥ 1 is `event_vocab[i]`. `horizon`, when given, checks the temporal priors cover it now.
    """

    def __init__(self, layout: HeadLayout, n_items: int, event_vocab: list[str | None] | tuple = (),
                 horizon: int | None = None) -> None:
        self.layout = layout
        self.n_items = n_items
        n_heads, n_leaves = layout.n_heads, len(layout.leaves)
        omega = torch.ones(n_heads, n_items + 1, dtype=torch.bool)
        # one entry per prior: (what it maps, leaf group [K] with -1 = unconstrained, lookup table)
        self.levels: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        for p, spec in enumerate(layout.priors):
            leaf_group = torch.full((n_heads,), -1, dtype=torch.long)
            for k, leaf in enumerate(layout.leaves):
                for pi, g in leaf:
                    if pi == p:
                        leaf_group[k] = g
            constrained = leaf_group >= 0
            table: torch.Tensor | None = None
            if spec.maps == ITEMS:
                items = self._item_table(spec, n_items)
                omega[constrained] &= items[leaf_group[constrained]]
            elif spec.maps == EVENTS:
                codes = [None] + list(event_vocab)[1:]
                table = torch.tensor([spec.event_groups.get(e, -1) for e in codes], dtype=torch.long)
            elif spec.maps == HORIZON:
                table = torch.as_tensor(np.asarray(spec.horizon_groups, dtype=np.int64))
                if horizon is not None and horizon > len(table):
                    raise self._horizon_error(spec, horizon)
            else:  # USERS
                table = torch.as_tensor(np.asarray(spec.user_groups, dtype=np.int64))
            self.levels.append((spec.maps, leaf_group, table))
        omega[:, 0] = False
        self.omega = omega
        self.n_leaves = n_leaves

    @staticmethod
    def _item_table(spec: PriorSpec, n_items: int) -> torch.Tensor:
        mat = np.asarray(spec.item_groups, dtype=bool)
        if mat.shape[1] < n_items + 1:
            raise StaleError(
                f"prior {spec.name!r} covers items 1..{mat.shape[1] - 1} but the catalogue has {n_items}",
                hint=f"rebuild the prior with `mhr priors build --name {spec.name} --force`",
            )
        return torch.from_numpy(mat[:, : n_items + 1].copy())

    @staticmethod
    def _horizon_error(spec: PriorSpec, tau: int) -> UsageError:
        return UsageError(
            f"temporal prior {spec.name!r} covers horizon offsets 1..{len(spec.horizon_groups)}, "
            f"but the windows predict {tau} items ahead",
            hint=f"rebuild it with `mhr priors build --kind temporal --horizon {tau}`",
        )

    def to(self, device: torch.device | str) -> Compatibility:
        self.omega = self.omega.to(device)
        self.levels = [
            (maps, lg.to(device), None if table is None else table.to(device)) for maps, lg, table in self.levels
        ]
        return self

    @property
    def device(self) -> torch.device:
        return self.omega.device

    def _user_group(self, table: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        users = users.long()
        inside = (users >= 0) & (users < len(table))
        return torch.where(inside, table[users.clamp(0, len(table) - 1)], -1)

    def targets(self, targets: torch.Tensor, target_events: torch.Tensor | None, users: torch.Tensor) -> torch.Tensor:
        """Bool [B, L, τ, K]: target (b, t, j) is a positive of head k.

        It must be a real item (≠ 0) satisfying every level of the leaf: item/graph — the item is
        in the group; event — its event code maps to the group; temporal — offset j+1 maps to
        the group; user — the user is in the group. Every target is a positive of the global head.
        A user without a group (-1 or unknown) is a positive of no user-level leaf.
        """
        targets = targets.long()
        tau = targets.shape[-1]
        ok = self.omega.t()[targets]  # [B, L, τ, K]: item levels (and item 0 -> False)
        for (maps, leaf_group, table), spec in zip(self.levels, self.layout.priors, strict=True):
            if maps == EVENTS:
                if target_events is None:
                    raise UsageError(f"event prior {spec.name!r} needs the targets' events")
                group = table[target_events.long()]  # [B, L, τ]
            elif maps == HORIZON:
                if tau > len(table):
                    raise self._horizon_error(spec, tau)
                group = table[:tau]  # [τ]
            elif maps == USERS:
                group = self._user_group(table, users).view(-1, 1, 1)  # [B, 1, 1]
            else:  # ITEMS: already in omega
                continue
            ok = ok & ((leaf_group < 0) | (group.unsqueeze(-1) == leaf_group))
        return ok

    def users(self, users: torch.Tensor) -> torch.Tensor:
        """Bool [B, K]: heads usable for each user — a leaf with a user level only for users of
        that group. A user with no group (-1, or unseen) may use every head, so still gets a list."""
        ok = torch.ones(len(users), self.layout.n_heads, dtype=torch.bool, device=self.device)
        for maps, leaf_group, table in self.levels:
            if maps == USERS:
                group = self._user_group(table, users.to(self.device)).unsqueeze(-1)
                ok &= (leaf_group < 0) | (group == leaf_group) | (group < 0)
        return ok

    def unreachable_items(self) -> torch.Tensor:
        """Item ids (≥ 1) that no head may score: they can never be recommended."""
        return torch.nonzero(~self.omega[:, 1:].any(0)).flatten() + 1
