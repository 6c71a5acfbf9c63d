"""`mhr recommend`: a user's top items from a trained run, with the head that recommended each.

The fusions are `mhr eval`'s, called the same way (`mhr.fusion.scoring_args`): max and avg as in the
paper, learned and invvar with the per-head parameters fitted on the run's validation split and
cached beside its evaluations (`mhr.evaluate.load_or_fit_fusion`), so recommend and eval rank alike.

The explanation (`Recommendation.head`): under max, the head that won the item. avg, learned and
invvar add the eligible heads' (weighted, calibrated) scores, so no head wins; the head named is
the one with the largest term of the fused score (`mhr.fusion.head_contributions`), and
`heads_fused` says how many heads were fused for the item (1: that head alone scored it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mhr import fusion as fusion_mod
from mhr.errors import NotFoundError, UsageError
from mhr.fusion import FITTED, FUSIONS, FusionFit
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
    head: str | None  # max: the winning head; avg/learned/invvar: the largest term of the fused score
    heads_fused: int  # eligible heads the user may use for this item, whose scores were fused


@torch.no_grad()
def recommend(run: LoadedRun, dataset: Dataset, raw_user: str, top: int = 10, fusion: str = "max",
              exclude_history: bool = True, fit: FusionFit | None = None
              ) -> tuple[list[Recommendation], dict[str, Any]]:
    """Rank the catalogue after the user's whole history (its last T interactions as context).

    `fusion`: max, avg, learned or invvar; a fitted fusion uses `fit` when given, else the run's
    cached fit (fitted on the validation split and written on first use, as `mhr eval` does)."""
    if fusion not in FUSIONS:
        raise UsageError(f"unknown fusion {fusion!r}", hint=f"use one of {', '.join(FUSIONS)}")
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
        if fusion in FITTED and fit is None:  # after the user check: a first fit takes a while
            from mhr.evaluate import load_or_fit_fusion

            fit = load_or_fit_fusion(run, fusion)
        scoring = fusion_mod.scoring_args(fusion, fit if fusion in FITTED else None)
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
        user_heads = run.compat.users(torch.tensor([user_id]))
        top_items, top_scores, winners = grouped_fused_topk(
            q, vecs, model.scorer, run.compat.omega, user_heads, exclude, top, **scoring
        )
        keep = torch.isfinite(top_scores[0]) & (top_items[0] > 0)  # fewer eligible items than `top`
        ids = [int(i) for i in top_items[0][keep]]
        heads, n_fused = _explain(run, q, vecs, user_heads, top_items[0][keep], winners[0][keep], scoring)
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
            head=names[heads[r]] if heads[r] >= 0 else None, heads_fused=n_fused[r],
        )
        for r, i in enumerate(ids)
    ]
    context = {"user": raw_user, "history_length": int(len(items_all)),
               "recent_titles": [t[0] for t in recent], "fusion": fusion}
    if fit is not None and fusion in FITTED:
        context["fitted_on"] = "valid"
    return recs, context


def _explain(run: LoadedRun, q: torch.Tensor, vecs: torch.Tensor, user_heads: torch.Tensor,
             items: torch.Tensor, winners: torch.Tensor, scoring: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(head id per item, -1 = none; heads fused per item) for the recommended `items` [M] of one
    user: max fusion's winner, or the largest term of the avg formula (`head_contributions`)."""
    allowed = run.compat.omega[:, items].unsqueeze(0) & user_heads.unsqueeze(-1)  # [1, K, M]
    n_fused = allowed.sum(dim=1)[0].tolist()
    if scoring["fusion"] == "max":
        return [int(w) for w in winners], n_fused
    scores = run.model.scorer(q, vecs[items])  # [1, K, M]
    params = {k: scoring.get(k) for k in ("weights", "scale", "offset")}
    _, top = fusion_mod.head_contributions(scores, allowed, **params)
    return top[0].tolist(), n_fused


def as_json(recs: list[Recommendation], context: dict[str, Any]) -> str:
    return json.dumps({**context, "items": [r.__dict__ for r in recs]}, indent=2)
