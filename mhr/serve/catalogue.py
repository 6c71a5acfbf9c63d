"""What `mhr serve` reads from the store once at start, so no request opens the database.

Users (raw id -> store id), every user's history in chronological order as CSR arrays (about 20
bytes an interaction: 10M interactions hold ~200 MB), items (raw id, title, tags) and the item priors
(kinds item and graph) as group-membership matrices. Raw ids are normalised as imports normalise
them (`mhr.data.dense.normalise_id`: surrounding spaces trimmed, "1.0" -> "1").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mhr.data.dense import normalise_id as normalise
from mhr.errors import NotFoundError
from mhr.priors.kinds import ITEM_KINDS
from mhr.priors.spec import PriorSpec, load_prior
from mhr.ranking.objectives import history_distribution, item_distribution
from mhr.store import connect
from mhr.workspace import Dataset


@dataclass(frozen=True)
class ItemPrior:
    """An item prior for display: `groups` bool [G, N+1] (item x in group g), names by group id."""

    name: str
    kind: str
    names: tuple[str, ...]
    groups: np.ndarray

    def of(self, item: int) -> list[str]:
        return [self.names[g] for g in np.flatnonzero(self.groups[:, item])]

    def share(self, items: np.ndarray) -> dict[str, float]:
        """Share of `items` in each group (an item in several groups counts in each), by group name: a
        list's exposure, as a quota (`steer`) counts it."""
        if len(items) == 0:
            return {n: 0.0 for n in self.names}
        share = self.groups[:, items].mean(axis=1)
        return {n: float(s) for n, s in zip(self.names, share, strict=True)}

    def mix(self, items: np.ndarray) -> dict[str, float]:
        """Steck's p(group | history) of `items`, the distribution `calibrate` aims the list at: each
        item's mass split evenly over its groups (`mhr.ranking.objectives.history_distribution`)."""
        n = len(items)
        # p(g | i) of the history's items only (a [N+1, G] table of the whole catalogue would be large);
        # column 0 stands for the padding item, which item_distribution leaves without mass
        cols = np.concatenate([np.zeros((len(self.names), 1), bool), self.groups[:, items]], axis=1)
        p = history_distribution(np.array([0, n]), np.arange(1, n + 1), item_distribution(cols))[0]
        return {n: float(v) for n, v in zip(self.names, p, strict=True)}


@dataclass
class Catalogue:
    dataset: str
    users: dict[str, int]  # raw user id -> store user id
    raw_users: list[str]  # raw user ids in store order
    ptr: np.ndarray  # [U + 2] CSR offsets of each store user id's history
    hist_items: np.ndarray  # [interactions] item ids, by user then pos
    hist_ts: np.ndarray  # [interactions] timestamps
    items: dict[str, int]  # raw item id -> item id
    raw_items: np.ndarray  # object [N + 1]: raw id by item id
    titles: np.ndarray  # object [N + 1]
    tags: list[list[str]]  # by item id
    priors: tuple[ItemPrior, ...]

    @classmethod
    def load(cls, dataset: Dataset, run_priors: tuple[PriorSpec, ...] = ()) -> Catalogue:
        """The store's users, histories, items and item priors (the run's own first)."""
        con = connect(dataset.store_path, read_only=True)
        try:
            users = con.execute("SELECT user_id, raw_id FROM users ORDER BY user_id").fetchall()
            hist = con.execute("SELECT user_id, item_id, ts FROM interactions ORDER BY user_id, pos").fetchnumpy()
            rows = con.execute("SELECT item_id, raw_id, title, tags FROM items ORDER BY item_id").fetchall()
            names = [p.name for p in run_priors if p.kind in ITEM_KINDS]
            names += [r[0] for r in con.execute("SELECT prior, kind FROM priors ORDER BY prior").fetchall()
                      if r[1] in ITEM_KINDS and r[0] not in names]
            specs = {p.name: p for p in run_priors}
            priors = tuple(_item_prior(specs.get(n) or load_prior(con, n)) for n in names)
        finally:
            con.close()
        n_users = max((u for u, _ in users), default=0)
        uid = hist["user_id"].astype(np.int64)
        ptr = np.searchsorted(uid, np.arange(n_users + 2)).astype(np.int64)
        n_items = max((r[0] for r in rows), default=0)
        raw_items, titles = np.full(n_items + 1, None, object), np.full(n_items + 1, None, object)
        tags: list[list[str]] = [[] for _ in range(n_items + 1)]
        for i, raw, title, t in rows:
            raw_items[i], titles[i], tags[i] = raw, title, list(t or [])
        return cls(dataset.name, {raw: int(u) for u, raw in users}, [raw for _, raw in users], ptr,
                   hist["item_id"].astype(np.int64), hist["ts"].astype(np.int64),
                   {raw: int(i) for i, raw, _, _ in rows}, raw_items, titles, tags, priors)

    def user(self, raw: object) -> int:
        key = normalise(raw)
        if key not in self.users:
            raise NotFoundError(f"user {key!r} is not in dataset {self.dataset}",
                                hint=f"pass a raw user id from the source data, e.g. {self.raw_users[0]}")
        return self.users[key]

    def item(self, raw: object) -> int:
        key = normalise(raw)
        if key not in self.items:
            raise NotFoundError(f"item {key!r} is not in dataset {self.dataset}",
                                hint="pass a raw item id from the source data")
        return self.items[key]

    def history(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, timestamps) of a store user, oldest first."""
        a, b = self.ptr[user_id], self.ptr[user_id + 1]
        return self.hist_items[a:b], self.hist_ts[a:b]

    def describe(self, item: int) -> dict:
        """An item as the API shows it: raw id, title, tags, groups per item prior."""
        return {"item": self.raw_items[item], "title": self.titles[item], "tags": self.tags[item],
                "groups": {p.name: p.of(item) for p in self.priors}}

    def exposure(self, items: np.ndarray) -> dict[str, dict[str, float]]:
        """Per item prior: the share of `items` in each group (`ItemPrior.share`)."""
        return {p.name: p.share(np.asarray(items, dtype=np.int64)) for p in self.priors}

    def mix(self, items: np.ndarray) -> dict[str, dict[str, float]]:
        """Per item prior: Steck's p(group | history) of the history `items` (`ItemPrior.mix`)."""
        return {p.name: p.mix(np.asarray(items, dtype=np.int64)) for p in self.priors}


def _item_prior(spec: PriorSpec) -> ItemPrior:
    return ItemPrior(spec.name, spec.kind, spec.group_names, spec.item_groups)
