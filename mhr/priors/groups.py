"""What a prior builder returns, and how it is written into the store.

Every kind's builder is a function `(con, params) -> PriorGroups`: group names plus exactly one
mapping (items, users, events or horizon offsets to groups) and a report of what it decided
(warnings, counts). `write_groups` inserts it; the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa


@dataclass
class PriorGroups:
    """Groups of one prior instance.

    `item_pairs` / `user_pairs`: (ids int64 [P], group ids int64 [P]) — multi-label for items;
    `event_map`: raw event value (None = NULL) -> group; `horizon`: int64 [τ], offset j+1 -> group.
    """

    names: list[str]
    item_pairs: tuple[np.ndarray, np.ndarray] | None = None
    user_pairs: tuple[np.ndarray, np.ndarray] | None = None
    event_map: dict[str | None, int] | None = None
    horizon: np.ndarray | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        self.report.setdefault("warnings", []).append(message)


def pairs_from_membership(ids: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((groups, ids))
    return np.asarray(ids, dtype=np.int64)[order], np.asarray(groups, dtype=np.int64)[order]


def write_groups(con: duckdb.DuckDBPyConnection, prior: str, groups: PriorGroups) -> None:
    """Insert the groups of `prior` (its old rows must already be deleted)."""
    con.executemany(
        "INSERT INTO prior_groups VALUES (?, ?, ?)", [(prior, g, n) for g, n in enumerate(groups.names)]
    )
    for table, pairs, column in (
        ("item_groups", groups.item_pairs, "item_id"),
        ("user_groups", groups.user_pairs, "user_id"),
    ):
        if pairs is None:
            continue
        ids, gids = pairs
        batch = pa.table(  # noqa: F841 — read by DuckDB's replacement scan
            {
                "prior": pa.array([prior] * len(ids), pa.string()),
                column: pa.array(ids.astype(np.int32)),
                "group_id": pa.array(gids.astype(np.int32)),
            }
        )
        con.execute(f"INSERT INTO {table} SELECT prior, {column}, group_id FROM batch")
    if groups.event_map is not None:
        con.executemany(
            "INSERT INTO event_groups VALUES (?, ?, ?)",
            [(prior, e, int(g)) for e, g in groups.event_map.items()],
        )
    if groups.horizon is not None:
        con.executemany(
            "INSERT INTO horizon_groups VALUES (?, ?, ?)",
            [(prior, j + 1, int(g)) for j, g in enumerate(groups.horizon)],
        )


def delete_prior(con: duckdb.DuckDBPyConnection, prior: str) -> None:
    for table in ("priors", "prior_groups", "item_groups", "user_groups", "event_groups", "horizon_groups"):
        con.execute(f"DELETE FROM {table} WHERE prior = ?", [prior])
