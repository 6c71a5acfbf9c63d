"""Tiny datasets written straight into a store, for tests of the later stages.

The planted structure: items belong to 3 genres (some to two); each user prefers one genre and
drifts to another in the second half of their history, so item and temporal priors carry signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mhr.cache import stage_key
from mhr.store import new_store, set_meta
from mhr.workspace import Dataset, Workspace

GENRES = ("Action", "Comedy", "Drama")


def make_dataset(root: Path, name: str = "tiny", n_users: int = 40, n_items: int = 30, seed: int = 0,
                 min_len: int = 24, max_len: int = 40, with_priors: bool = True, horizon: int = 4) -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Workspace(root).dataset(name)
    genre_of = np.arange(n_items) % len(GENRES)
    second = {i: (genre_of[i] + 1) % len(GENRES) for i in range(0, n_items, 5)}
    with new_store(ds.store_path) as con:
        for i in range(n_items):
            tags = [GENRES[genre_of[i]]] + ([GENRES[second[i]]] if i in second else [])
            con.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                        [i + 1, f"i{i}", f"Item {i} ({'/'.join(tags)})", "", tags, "{}"])
        rows = []
        for u in range(n_users):
            con.execute("INSERT INTO users VALUES (?, ?, ?)",
                        [u + 1, f"u{u}", json.dumps({"age": int(20 + u % 40), "segment": u % 2})])
            n = int(rng.integers(min_len, max_len + 1))
            g1, g2 = u % 3, (u + 1) % 3
            for p in range(n):
                g = g1 if p < n // 2 else g2
                pool = np.flatnonzero(genre_of == g) if rng.random() < 0.85 else np.arange(n_items)
                item = int(rng.choice(pool)) + 1
                event = "buy" if rng.random() < 0.2 else "view"
                rows.append((u + 1, item, 1_000_000 + 3600 * p + u, event, p))
        u, i, t, e, p = zip(*rows, strict=True)
        table = pa.table({"user_id": pa.array(u, pa.int32()), "item_id": pa.array(i, pa.int32()),
                          "ts": pa.array(t, pa.int64()), "event": pa.array(e), "pos": pa.array(p, pa.int32())})
        con.register("new_rows", table)
        con.execute("INSERT INTO interactions SELECT * FROM new_rows")
        con.unregister("new_rows")
        set_meta(con, data_key=stage_key("data", {"tiny": seed, "n": n_users}, {}), source="tests",
                 has_timestamps=True, name=name)
        if with_priors:
            add_item_prior(con)
            add_temporal_prior(con, horizon)
            add_event_prior(con)
            add_user_prior(con)
    return ds


def _prior_row(con, name: str, kind: str, params: dict) -> None:
    con.execute("INSERT INTO priors VALUES (?, ?, ?, ?, '{}', now())",
                [name, kind, json.dumps(params), stage_key("priors", {"kind": kind, **params}, {})])


def add_item_prior(con, name: str = "item") -> None:
    _prior_row(con, name, "item", {"holdout": 16})
    for g, genre in enumerate(GENRES):
        con.execute("INSERT INTO prior_groups VALUES (?, ?, ?)", [name, g, genre])
        con.execute(
            "INSERT INTO item_groups SELECT ?, item_id, ? FROM items WHERE list_contains(tags, ?)",
            [name, g, genre],
        )


def add_temporal_prior(con, horizon: int, name: str = "temporal") -> None:
    _prior_row(con, name, "temporal", {"horizon": horizon, "segments": 2})
    for g, seg in enumerate(("ST", "LT")):
        con.execute("INSERT INTO prior_groups VALUES (?, ?, ?)", [name, g, seg])
    half = horizon // 2 or 1
    for off in range(1, horizon + 1):
        con.execute("INSERT INTO horizon_groups VALUES (?, ?, ?)", [name, off, 0 if off <= half else 1])


def add_event_prior(con, name: str = "event") -> None:
    _prior_row(con, name, "event", {})
    for g, ev in enumerate(("view", "buy")):
        con.execute("INSERT INTO prior_groups VALUES (?, ?, ?)", [name, g, ev])
        con.execute("INSERT INTO event_groups VALUES (?, ?, ?)", [name, ev, g])


def add_user_prior(con, name: str = "user") -> None:
    _prior_row(con, name, "user", {"holdout": 16})
    for g in range(2):
        con.execute("INSERT INTO prior_groups VALUES (?, ?, ?)", [name, g, f"segment{g}"])
    con.execute("INSERT INTO user_groups SELECT ?, user_id, user_id % 2 FROM users", [name])


def dot(q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Plain dot-product scores, the simplest scorer."""
    return q @ items.transpose(-1, -2)


def interrupt_at_batch(monkeypatch, n: int, run) -> None:
    """Run `run()` with the training loop killed (KeyboardInterrupt) when it cuts its n-th batch,
    as a user's Ctrl-C would; the real batch function is restored afterwards."""
    import pytest

    import mhr.training.train as mt

    real_batch, calls = mt.make_batch, {"n": 0}

    def crashing_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(mt, "make_batch", crashing_batch)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(mt, "make_batch", real_batch)


def weighted_head_means(sums: list, counts: list[int], head_weights: str):
    """The loss references' last step: per-head mean cross-entropies combined with frequency
    (w_k ∝ |Y_k|) or uniform weights over the heads that have a positive."""
    present = [k for k in range(len(counts)) if counts[k]]
    total = sum(counts)
    if head_weights == "frequency":
        return sum(counts[k] / total * sums[k] / counts[k] for k in present)
    return sum(sums[k] / counts[k] for k in present) / len(present)
