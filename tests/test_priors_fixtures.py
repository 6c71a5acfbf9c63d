"""Tiny stores with planted structure for the prior tests (and a check of the helpers themselves).

`make_store`: `n_comm` item communities of `per_comm` items; each user belongs to one community
and draws `noise` of their interactions from anywhere, the rest from their community. Items carry
genre tags of their community (some untagged); events are ratings "1".."5"; users carry
`age` / `gender` attributes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from mhr.cache import stage_key
from mhr.store import new_store, set_meta
from mhr.workspace import Dataset, Workspace

GENRES = ("Horror", "Comedy", "Romance", "Documentary")


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean normalisation) of two labelings."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    n = len(a)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    p = joint / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    ha = -(pa[pa > 0] * np.log(pa[pa > 0])).sum()
    hb = -(pb[pb > 0] * np.log(pb[pb > 0])).sum()
    return float(mi / ((ha + hb) / 2)) if ha + hb > 0 else 1.0


def make_store(
    root: Path,
    name: str = "tiny",
    n_comm: int = 4,
    per_comm: int = 20,
    n_users: int = 80,
    length: int = 40,
    noise: float = 0.1,
    seed: int = 0,
    tags: bool = True,
    untagged: int = 2,
    events: str = "rating",
    extra_items: int = 0,
) -> Dataset:
    """Write the store; truth in `planted_items(...)` / `planted_users(...)`."""
    rng = np.random.default_rng(seed)
    ds = Workspace(root).dataset(name)
    n_items = n_comm * per_comm
    item_comm = np.arange(n_items) // per_comm
    with new_store(ds.store_path) as con:
        for i in range(n_items + extra_items):
            t: list[str] = []
            if tags and i < n_items and i % per_comm >= untagged:
                t = [GENRES[item_comm[i] % len(GENRES)]]
            con.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", [i + 1, f"i{i}", f"item {i}", "", t, "{}"])
        rows = []
        for u in range(n_users):
            c = u % n_comm
            attrs = {"age": int(18 + (u * 7) % 50), "gender": "F" if u % 2 else "M"}
            con.execute("INSERT INTO users VALUES (?, ?, ?)", [u + 1, f"u{u}", json.dumps(attrs)])
            own = np.flatnonzero(item_comm == c)
            for p in range(length):
                pool = own if rng.random() >= noise else np.arange(n_items)
                item = int(rng.choice(pool)) + 1
                ev = str(int(rng.integers(1, 6))) if events == "rating" else ("buy" if p % 10 == 0 else "view")
                rows.append((u + 1, item, 1000 + 60 * p, ev, p))
        u, i, ts, ev, pos = (list(c) for c in zip(*rows, strict=True))
        log = pa.table({"user_id": pa.array(u, pa.int32()), "item_id": pa.array(i, pa.int32()),  # noqa: F841
                        "ts": pa.array(ts, pa.int64()), "event": pa.array(ev, pa.string()),
                        "pos": pa.array(pos, pa.int32())})
        con.execute("INSERT INTO interactions SELECT * FROM log")
        set_meta(con, data_key=stage_key("data", {"test": name, "seed": seed}, {}), source="tests",
                 has_timestamps=True, name=name)
    return ds


def planted_items(n_comm: int = 4, per_comm: int = 20) -> np.ndarray:
    return np.arange(n_comm * per_comm) // per_comm


def planted_users(n_users: int = 80, n_comm: int = 4) -> np.ndarray:
    return np.arange(n_users) % n_comm


def test_nmi_hand_cases():
    assert nmi(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])) == 1.0
    assert nmi(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])) < 1e-9


def test_make_store(tmp_path):
    from mhr.store import connect

    ds = make_store(tmp_path)
    con = connect(ds.store_path, read_only=True)
    assert con.execute("SELECT count(*) FROM interactions").fetchone()[0] == 80 * 40
    assert con.execute("SELECT count(*) FROM items WHERE len(tags) = 0").fetchone()[0] == 4 * 2
    con.close()
