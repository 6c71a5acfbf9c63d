"""user prior: user segments, from the user co-engagement graph or from attributes. A user is
scored only by their own segment's head, which may score every item.

Graph: two users are linked when they engaged with the same item in training (each user's last
`holdout` interactions dropped, as for the graph prior; at most `per_item` = 2000 users sampled per
item, seeded — the paper's cap), Leiden into `clusters` segments; users without an edge form the
"other" segment. Attributes: one segment per combination of the attributes' values, numeric
attributes binned into `bins` quantile bins; a missing value is its own `unknown` bin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import numpy as np

from mhr.errors import InputError, UsageError
from mhr.options import join_names, option, split_names
from mhr.priors.groups import PriorGroups, pairs_from_membership


@dataclass(frozen=True)
class UserParams:
    clusters: int | None = option(None, "Number of communities to reach (resolution search).")
    from_attributes: tuple[str, ...] = option((), "Segment by attributes 'age,gender'.", parse=split_names,
                                              show=join_names)
    bins: int = option(4, "Quantile bins for numeric attributes.")
    min_size: int = option(5, "Communities smaller than this merge into 'other'.")
    holdout: int = option(16, "Last interactions per user never read (≥ 2τ of the windows).")
    per_item: int = option(2000, "Users sampled per item.")
    neighbors: int = option(50, "Edges kept per node (top cosine; 0 = all).")
    weights: str = option("count", "Edge weights: count (co-count) or binary.")
    seed: int = option(0, "Leiden / sampling seed.")

    def check(self) -> None:
        if self.from_attributes and self.clusters is not None:
            raise UsageError("--clusters and --from-attributes exclude each other", hint="pick one")
        if self.bins < 1 or self.per_item < 1 or self.holdout < 0 or self.neighbors < 0:
            raise UsageError("--bins ≥ 1, --per-item ≥ 1, --holdout ≥ 0 and --neighbors ≥ 0 are required")
        if self.weights not in ("binary", "count"):
            raise UsageError(f"--weights {self.weights!r} is not one of binary, count")


def sample_per_item(users: np.ndarray, items: np.ndarray, per_item: int, seed: int) -> np.ndarray:
    """Mask keeping at most `per_item` randomly chosen (seeded) users of each item."""
    key = np.random.default_rng(seed).random(len(users))
    order = np.lexsort((key, users, items))  # users as a tie-break keeps it independent of row order
    sorted_items = items[order]
    starts = np.flatnonzero(np.r_[True, sorted_items[1:] != sorted_items[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    keep = np.zeros(len(users), dtype=bool)
    keep[order[rank < per_item]] = True
    return keep


def _from_graph(con: duckdb.DuckDBPyConnection, p: UserParams, n_users: int) -> PriorGroups:
    from mhr.priors.coengagement import binary_matrix, communities, knn_edges, training_pairs  # igraph: slow

    n_items = int(con.execute("SELECT coalesce(max(item_id), 0) FROM items").fetchone()[0])
    users, items = training_pairs(con, p.holdout)
    order = np.lexsort((items, users))  # canonical order so sampling does not depend on the scan
    users, items = users[order], items[order]
    keep = sample_per_item(users, items, p.per_item, p.seed)
    m = binary_matrix(users[keep], items[keep], (n_users + 1, n_items + 1))
    src, dst, count = knn_edges(m, p.neighbors)
    found = communities(n_users + 1, src, dst, None if p.weights == "binary" else count,
                        clusters=p.clusters, min_size=p.min_size, seed=p.seed)
    member = found.membership[1:]
    names = [f"u{k + 1}" for k in range(found.n_clusters)]
    if (member == found.n_clusters).any():
        names.append("other")
    groups = PriorGroups(names, user_pairs=pairs_from_membership(np.arange(1, n_users + 1), member))
    info = found.info
    info.pop("nodes", None)
    info["isolated"] = max(info["isolated"] - 1, 0)  # node 0 is padding
    info["other_nodes"] = int((member == found.n_clusters).sum())
    info["sampled_pairs"] = int(keep.sum())
    info["training_pairs"] = len(users)
    groups.report.update(graph=info)
    if info.get("unreachable"):
        groups.warn(f"{p.clusters} segments of ≥ {p.min_size} users cannot be reached; closest: "
                    f"{found.n_clusters} (resolution {info['resolution']:.4g})")
    if info["isolated"]:
        groups.warn(f"{info['isolated']} users share no training item with anyone: 'other' segment")
    return groups


def _numeric(values: list) -> bool:
    seen = [v for v in values if v is not None]
    if not seen:
        return False
    for v in seen:
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, float)):
            continue
        try:
            float(v)
        except (TypeError, ValueError):
            return False
    return True


def _fmt(x: float) -> str:
    return f"{x:g}"


def _labels(attr: str, values: list, bins: int) -> list[str]:
    if _numeric(values):
        present = np.array([float(v) for v in values if v is not None])
        edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)))
        out = []
        for v in values:
            if v is None:
                out.append(f"{attr}:unknown")
                continue
            b = int(np.searchsorted(edges[1:-1], float(v), side="right"))
            lo, hi = edges[b], edges[min(b + 1, len(edges) - 1)]
            out.append(f"{attr}:{_fmt(lo)}" if lo == hi else f"{attr}:{_fmt(lo)}-{_fmt(hi)}")
        return out
    return [f"{attr}:{'unknown' if v is None else v}" for v in values]


def _from_attributes(con: duckdb.DuckDBPyConnection, p: UserParams) -> PriorGroups:
    rows = con.execute("SELECT user_id, attrs FROM users ORDER BY user_id").fetchall()
    attrs = []
    for uid, text in rows:
        try:
            a = json.loads(text) if text else {}
        except json.JSONDecodeError:
            raise InputError(f"users.attrs of user_id {uid} is not JSON: {text[:60]!r}",
                             hint="re-import the dataset with valid user attributes") from None
        attrs.append(a if isinstance(a, dict) else {})
    available = sorted({k for a in attrs for k in a})
    missing = [a for a in p.from_attributes if a not in available]
    if missing:
        raise UsageError(
            f"user attribute(s) {', '.join(missing)} do not exist in this dataset "
            f"(available: {', '.join(available) or 'none'})",
            hint="pass --from-attributes with some of the available names, or use --clusters N",
        )
    columns = [_labels(name, [a.get(name) for a in attrs], p.bins) for name in p.from_attributes]
    combos = ["/".join(parts) for parts in zip(*columns, strict=True)]
    counts: dict[str, int] = {}
    for c in combos:
        counts[c] = counts.get(c, 0) + 1
    names = sorted(counts, key=lambda c: (-counts[c], c))
    index = {c: g for g, c in enumerate(names)}
    uids = np.array([r[0] for r in rows], dtype=np.int64)
    gids = np.array([index[c] for c in combos], dtype=np.int64)
    groups = PriorGroups(names, user_pairs=pairs_from_membership(uids, gids))
    groups.report["attributes"] = list(p.from_attributes)
    small = [n for n in names if counts[n] < p.min_size]
    if small:
        groups.warn(f"{len(small)} segments have fewer than {p.min_size} users (e.g. {small[0]})")
    return groups


def build_user_prior(con: duckdb.DuckDBPyConnection, p: UserParams) -> PriorGroups:
    p.check()
    n_users = int(con.execute("SELECT coalesce(max(user_id), 0) FROM users").fetchone()[0])
    if n_users == 0:
        raise InputError("the store has no users", hint="import a dataset first with `mhr data …`")
    if p.from_attributes:
        return _from_attributes(con, p)
    return _from_graph(con, p, n_users)
