"""A built prior as the model sees it: groups plus what makes an item or a target compatible."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np

from mhr.errors import NotFoundError
from mhr.priors.kinds import EVENTS, HORIZON, ITEMS, USERS, prior_kind


@dataclass(frozen=True, eq=False)
class PriorSpec:
    """One prior instance loaded from the store.

    Exactly one of the mapping fields is set, according to what the kind maps (`maps`,
    `mhr.priors.kinds.KINDS`):
    `item_groups` bool [G, n_items + 1] (items; column 0 is padding and False),
    `event_groups` raw event value -> group (events; key None = NULL event),
    `horizon_groups` int64 [tau], offset j+1 -> group (horizon),
    `user_groups` int64 [n_users + 1] -> group, -1 = none (users).
    """

    name: str
    kind: str
    key: str
    group_names: tuple[str, ...]
    params: dict[str, Any]
    item_groups: np.ndarray | None = None
    event_groups: dict[str | None, int] | None = None
    horizon_groups: np.ndarray | None = None
    user_groups: np.ndarray | None = None

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    @property
    def maps(self) -> str:
        """What the groups map: items, events, horizon (offsets) or users."""
        return prior_kind(self.kind).maps

    @property
    def restricts_items(self) -> bool:
        return self.maps == ITEMS


def list_priors(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("SELECT prior FROM priors ORDER BY prior").fetchall()]


def _item_groups(con: duckdb.DuckDBPyConnection, name: str, n_groups: int) -> dict[str, Any]:
    n_items = con.execute("SELECT coalesce(max(item_id), 0) FROM items").fetchone()[0]
    pairs = con.execute("SELECT group_id, item_id FROM item_groups WHERE prior = ?", [name]).fetchnumpy()
    mat = np.zeros((n_groups, n_items + 1), dtype=bool)
    mat[pairs["group_id"].astype(np.int64), pairs["item_id"].astype(np.int64)] = True
    return {"item_groups": mat}


def _event_groups(con: duckdb.DuckDBPyConnection, name: str, n_groups: int) -> dict[str, Any]:
    rows = con.execute("SELECT event, group_id FROM event_groups WHERE prior = ?", [name]).fetchall()
    return {"event_groups": {e: int(g) for e, g in rows}}


def _horizon_groups(con: duckdb.DuckDBPyConnection, name: str, n_groups: int) -> dict[str, Any]:
    rows = con.execute(
        'SELECT "offset", group_id FROM horizon_groups WHERE prior = ? ORDER BY "offset"', [name]
    ).fetchall()
    return {"horizon_groups": np.array([g for _, g in rows], dtype=np.int64)}


def _user_groups(con: duckdb.DuckDBPyConnection, name: str, n_groups: int) -> dict[str, Any]:
    n_users = con.execute("SELECT coalesce(max(user_id), 0) FROM users").fetchone()[0]
    arr = np.full(n_users + 1, -1, dtype=np.int64)
    pairs = con.execute("SELECT user_id, group_id FROM user_groups WHERE prior = ?", [name]).fetchnumpy()
    arr[pairs["user_id"].astype(np.int64)] = pairs["group_id"].astype(np.int64)
    return {"user_groups": arr}


# what a kind maps -> how its mapping is read from the store
_READERS = {ITEMS: _item_groups, EVENTS: _event_groups, HORIZON: _horizon_groups, USERS: _user_groups}


def load_prior(con: duckdb.DuckDBPyConnection, name: str) -> PriorSpec:
    row = con.execute("SELECT kind, key, params FROM priors WHERE prior = ?", [name]).fetchone()
    if row is None:
        built = ", ".join(list_priors(con)) or "none"
        raise NotFoundError(
            f"prior {name!r} is not built for this dataset (built: {built})",
            hint=f"build it with `mhr priors build --kind KIND --name {name}`",
        )
    kind, key, params = row
    names = tuple(
        r[0] for r in con.execute("SELECT name FROM prior_groups WHERE prior = ? ORDER BY group_id", [name]).fetchall()
    )
    fields = _READERS[prior_kind(kind).maps](con, name, len(names))
    return PriorSpec(name, kind, key, names, json.loads(params or "{}"), **fields)
