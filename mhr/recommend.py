"""`mhr recommend`: a user's top items from a trained run, with the head that recommended each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mhr.errors import NotFoundError
from mhr.scoring import grouped_fused_topk
from mhr.store import connect
from mhr.train import LoadedRun
from mhr.workspace import Dataset


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_id: int
    raw_id: str
    title: str | None
    score: float
    head: str | None  # the head that won under max fusion: the explanation


@torch.no_grad()
def recommend(run: LoadedRun, dataset: Dataset, raw_user: str, top: int = 10, fusion: str = "max",
              exclude_history: bool = True) -> tuple[list[Recommendation], dict[str, Any]]:
    """Rank the catalogue after the user's whole history (its last T interactions as context)."""
    T = int(run.windows.params["context"])
    con = connect(dataset.store_path, read_only=True)
    try:
        row = con.execute("SELECT user_id FROM users WHERE raw_id = ?", [raw_user]).fetchone()
        if row is None:
            sample = [r[0] for r in con.execute("SELECT raw_id FROM users ORDER BY user_id LIMIT 3").fetchall()]
            raise NotFoundError(
                f"user {raw_user!r} is not in dataset {dataset.name}",
                hint=f"pass a raw user id from the source data, e.g. {', '.join(sample)}",
            )
        user_id = int(row[0])
        hist = con.execute(
            "SELECT item_id, ts FROM interactions WHERE user_id = ? ORDER BY pos", [user_id]
        ).fetchnumpy()
        items_all = hist["item_id"].astype(np.int64)
        ts_all = hist["ts"].astype(np.int64)
        ctx_items, ctx_ts = items_all[-T:], ts_all[-T:]
        model = run.model
        vecs = model.item_vectors().float()
        n_items = vecs.shape[0] - 1
        items = torch.from_numpy(ctx_items)[None]
        ts = torch.from_numpy(ctx_ts)[None]
        length = torch.tensor([len(ctx_items)])
        q = model.last_queries(items, ts, length).float()
        exclude = None
        if exclude_history:
            exclude = torch.zeros(1, n_items + 1, dtype=torch.bool)
            exclude[0, torch.from_numpy(items_all)] = True
        users = torch.tensor([user_id])
        top_items, top_scores, winners = grouped_fused_topk(
            q, vecs, model.scorer, run.compat.omega, run.compat.users(users), exclude, top, fusion
        )
        keep = torch.isfinite(top_scores[0]) & (top_items[0] > 0)  # fewer eligible items than `top`
        ids = [int(i) for i in top_items[0][keep]]
        meta = {
            int(r[0]): (r[1], r[2])
            for r in con.execute(
                "SELECT item_id, raw_id, title FROM items WHERE item_id IN (SELECT unnest(?))", [ids]
            ).fetchall()
        }
        recent = con.execute(
            "SELECT i.title FROM interactions x JOIN items i USING (item_id) WHERE x.user_id = ? "
            "ORDER BY x.pos DESC LIMIT 5", [user_id]
        ).fetchall()
    finally:
        con.close()
    names = run.layout.names
    recs = [
        Recommendation(
            rank=r + 1, item_id=i, raw_id=meta[i][0], title=meta[i][1], score=float(top_scores[0, r]),
            head=names[int(winners[0, r])] if fusion == "max" and int(winners[0, r]) >= 0 else None,
        )
        for r, i in enumerate(ids)
    ]
    context = {"user": raw_user, "history_length": int(len(items_all)),
               "recent_titles": [t[0] for t in recent]}
    return recs, context


def as_json(recs: list[Recommendation], context: dict[str, Any]) -> str:
    return json.dumps({**context, "items": [r.__dict__ for r in recs]}, indent=2)
