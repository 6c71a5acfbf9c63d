"""graph prior: Leiden communities of the item co-engagement graph. A community's head scores only
the community's items.

Two items are linked when a user engaged with both among their training interactions (each user
capped to their last `cap` = 1000 training interactions, the paper's cap). Each user's last
`holdout` interactions are never read: they are the validation and test targets of windows with
τ ≤ holdout / 2 (default 16 = 2 × 8), so the prior leaks nothing about what is evaluated.
Communities are found with Leiden (modularity, seeded); `clusters` searches the resolution.
Items with no edge (never engaged with in training, or only by users with one item) go to the
"other" group (`isolated = "other"`) or to every group (`isolated = "all"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from mhr.errors import UsageError
from mhr.options import option
from mhr.priors.groups import PriorGroups, pairs_from_membership

WEIGHTS = ("binary", "count")
ISOLATED = ("other", "all")


@dataclass(frozen=True)
class GraphParams:
    clusters: int | None = option(None, "Number of communities to reach (resolution search).")
    min_size: int = option(5, "Communities smaller than this merge into 'other'.")
    holdout: int = option(16, "Last interactions per user never read (≥ 2τ of the windows).")
    cap: int = option(1000, "Last training interactions per user.")
    neighbors: int = option(50, "Edges kept per node (top cosine; 0 = all).")
    weights: str = option("count", "Edge weights: count (co-count) or binary.")
    isolated: str = option("other", "Items without edges -> other or all.")
    seed: int = option(0, "Leiden / sampling seed.")

    def check(self) -> None:
        if self.weights not in WEIGHTS:
            raise UsageError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.isolated not in ISOLATED:
            raise UsageError(f"--isolated {self.isolated!r} is not one of {', '.join(ISOLATED)}")
        if self.clusters is not None and self.clusters < 1:
            raise UsageError("--clusters must be ≥ 1")
        if self.holdout < 0 or self.cap < 1 or self.neighbors < 0 or self.min_size < 1:
            raise UsageError("--holdout ≥ 0, --cap ≥ 1, --neighbors ≥ 0 and --min-size ≥ 1 are required")


def top_tags(con: duckdb.DuckDBPyConnection, item_ids: np.ndarray, group_ids: np.ndarray, n_groups: int,
             k: int = 3) -> list[list[str]]:
    """The most frequent tags of each group's items (to help a person name the communities)."""
    import pyarrow as pa

    pairs = pa.table({"item_id": pa.array(item_ids.astype(np.int32)),  # noqa: F841
                      "group_id": pa.array(group_ids.astype(np.int32))})
    rows = con.execute(
        """
        SELECT group_id, tag, count(*) AS n FROM (
            SELECT p.group_id, unnest(i.tags) AS tag FROM pairs p JOIN items i USING (item_id))
        GROUP BY ALL ORDER BY group_id, n DESC, tag
        """
    ).fetchall()
    out: list[list[str]] = [[] for _ in range(n_groups)]
    for g, tag, _ in rows:
        if len(out[g]) < k:
            out[g].append(tag)
    return out


def build_graph_prior(con: duckdb.DuckDBPyConnection, p: GraphParams) -> PriorGroups:
    p.check()
    from mhr.priors.coengagement import binary_matrix, communities, knn_edges, training_pairs  # igraph: slow

    n_items = int(con.execute("SELECT coalesce(max(item_id), 0) FROM items").fetchone()[0])
    n_users = int(con.execute("SELECT coalesce(max(user_id), 0) FROM users").fetchone()[0])
    users, items = training_pairs(con, p.holdout, p.cap)
    n_pairs = len(users)
    n_users = max(n_users, int(users.max()) if len(users) else 0)
    m = binary_matrix(items, users, (n_items + 1, n_users + 1))  # rows = items (0 = padding, empty)
    del users, items  # ≈ 16 bytes a training pair, not needed past the matrix (the peak is later)
    src, dst, count = knn_edges(m, p.neighbors)
    del m
    found = communities(
        n_items + 1, src, dst, None if p.weights == "binary" else count,
        clusters=p.clusters, min_size=p.min_size, seed=p.seed,
    )
    member = found.membership[1:]
    ids = np.arange(1, n_items + 1)
    isolated = np.ones(n_items + 1, dtype=bool)
    isolated[src] = False
    isolated[dst] = False
    isolated = isolated[1:]
    names = [f"c{k + 1}" for k in range(found.n_clusters)]
    if p.isolated == "all" and found.n_clusters > 0:
        # isolated items join every community; small communities still form "other"
        keep = ~isolated
        item_ids = [ids[keep]]
        group_ids = [member[keep]]
        for g in range(found.n_clusters):
            item_ids.append(ids[isolated])
            group_ids.append(np.full(int(isolated.sum()), g))
        item_col, group_col = np.concatenate(item_ids), np.concatenate(group_ids)
        has_other = bool((member[keep] == found.n_clusters).any())
    else:
        item_col, group_col = ids, member
        has_other = bool((member == found.n_clusters).any())
    if has_other:
        names.append("other")
    groups = PriorGroups(names, item_pairs=pairs_from_membership(item_col, group_col))
    info = found.info
    info.pop("nodes", None)
    info["isolated"] = int(isolated.sum())  # padding row 0 is not an item
    info["other_nodes"] = int((group_col == found.n_clusters).sum())
    info["training_pairs"] = n_pairs
    groups.report.update(graph=info)
    try:
        groups.report["top_tags"] = dict(zip(names, top_tags(con, item_col, group_col, len(names)), strict=True))
    except duckdb.InterruptException:
        raise  # Ctrl-C during the query: not a reason to go on without the tags
    except duckdb.Error:
        pass  # tags are decoration: a store whose items have none still gets its groups
    if info.get("unreachable"):
        groups.warn(f"{p.clusters} clusters of ≥ {p.min_size} items cannot be reached; closest: "
                    f"{found.n_clusters} (resolution {info['resolution']:.4g})")
    if info["isolated"]:
        where = "the 'other' group" if p.isolated == "other" else "every group"
        groups.warn(f"{info['isolated']} items have no co-engagement edge (isolated): put in {where}")
    return groups
