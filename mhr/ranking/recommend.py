"""`mhr recommend`: a user's top items from a trained run, with the head that recommended each.

One ranking path, `rank_histories` (histories in, top-k with explanations out), serves the three
callers: `recommend` (one stored user, `--user`), `export_recommendations` (every stored user to a
Parquet file, `--all`) and `mhr.ranking.service.Recommender` (a raw history, for a service). Each ranks
after the whole history: its last T interactions are the model's context and, by default, every
item of it is excluded, as evaluation does.

The fusions are `mhr eval`'s, called the same way (`mhr.ranking.fusion.scoring_args`): max and avg as in the
paper, learned and invvar with the per-head parameters fitted on the run's validation split and
cached beside its evaluations (`mhr.ranking.fusion_fit.load_or_fit_fusion`), so recommend and eval rank alike.

The explanation (`Recommendation.head`): under max, the head that won the item. avg, learned and
invvar add the eligible heads' (weighted, calibrated) scores, so no head wins; the head named is
the one with the largest term of the fused score (`mhr.ranking.fusion.head_contributions`), and
`heads_fused` says how many heads were fused for the item (1: that head alone scored it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mhr.cache import check_output, sweep_temps
from mhr.console import err, progress
from mhr.data.dense import normalise_id
from mhr.errors import InputError, NotFoundError, UsageError
from mhr.priors.spec import PriorSpec
from mhr.ranking import fusion as fusion_mod
from mhr.ranking.decode import (
    Resolved,
    interest_profile,
    profile_priors,
    rank_objectives,
    resolve,
    with_head_boost,
)
from mhr.ranking.fusion import FITTED, FUSIONS, FusionFit
from mhr.ranking.fusion_fit import load_or_fit_fusion
from mhr.ranking.inference import iter_queries
from mhr.ranking.objectives import Objectives
from mhr.store import connect
from mhr.training.runs import LoadedRun
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
    route_p: float | None = None  # router fusion: p(k | h) of the winning head k


QUERY_BATCH = 256  # histories per backbone pass and ranking batch: bounds activations and [b, N+1] buffers


@dataclass(frozen=True)
class TopK:
    """A batch of ranked lists. Slots no item can fill (fewer candidates than `top`) hold item 0;
    `heads` is -1 there and everywhere when not explained."""

    items: np.ndarray  # [B, top] int64 item ids
    scores: np.ndarray  # [B, top] float32 fused scores
    heads: np.ndarray  # [B, top] int64 explaining head (`_explain`), -1 = none
    heads_fused: np.ndarray  # [B, top] int64 eligible heads fused for the item (0 when not explained)
    route_p: np.ndarray | None = None  # [B, top] router fusion: p(k | h) of the explaining head (NaN = none)

    def filled(self) -> np.ndarray:
        """Bool [B, top]: the slots holding a recommended item (a prefix of each row)."""
        return np.isfinite(self.scores) & (self.items > 0)


def scoring_for(run: LoadedRun, fusion: str, fit: FusionFit | None = None) -> dict[str, Any]:
    """`grouped_fused_topk`'s keyword arguments for a fusion name, as `mhr eval` ranks: a fitted
    fusion uses `fit` when given, else the run's cached fit (fitted on valid on first use)."""
    check_fusion(fusion)
    if fusion in FITTED and fit is None:
        fit = load_or_fit_fusion(run, fusion)
    return fusion_mod.scoring_args(fusion, fit if fusion in FITTED else None)


def check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise UsageError(f"unknown fusion {fusion!r}", hint=f"use one of {', '.join(FUSIONS)}")


@torch.no_grad()
def rank_histories(run: LoadedRun, histories: Sequence[tuple[np.ndarray, np.ndarray]], users: np.ndarray,
                   top: int, scoring: dict[str, Any], exclude_history: bool = True,
                   explain: bool = True, objectives: Resolved | None = None) -> TopK:
    """Top `top` items after each whole history, the one ranking path of `mhr recommend` (one user,
    `--all`) and `mhr.ranking.service.Recommender`: `mhr.ranking.inference.rank_split`, the ranking of `mhr eval`,
    on the histories laid out as a split, so every fusion eval knows ranks here alike.

    `histories`: per user (item ids, timestamps), chronological; the last T are the context and,
    with `exclude_history`, every item of it is excluded. `users` [B]: store user ids for user
    priors' heads (-1: anonymous, every head). `scoring`: `scoring_for(...)`. `objectives`: steer,
    boost or calibrate the lists (`mhr.ranking.decode.rank_objectives`; None: the plain ranking)."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if not histories:
        raise ValueError("no history to rank after")
    split = _as_split(histories, users, int(run.windows.params["context"]))
    device = run.compat.omega.device
    ranking = rank_objectives(run, split, top, scoring, objectives, exclude_history=exclude_history,
                              batch_size=QUERY_BATCH, device=device)
    if objectives is not None:  # explanations of boosted heads name the boosted terms
        scoring = with_head_boost(scoring, objectives.head_boost)
    items = torch.from_numpy(ranking.items)
    filled = torch.from_numpy(np.isfinite(ranking.scores)) & (items > 0)
    heads, n_fused = torch.full_like(items, -1), torch.zeros_like(items)
    route_p = None
    if explain:
        heads, n_fused = _explain(run, split, items, torch.from_numpy(ranking.winners), filled, scoring)
        if scoring.get("fusion") == "router":
            route_p = _route_probabilities(run, split, heads.masked_fill(~filled, -1))
    return TopK(ranking.items, ranking.scores.astype(np.float32),
                heads.masked_fill(~filled, -1).numpy(), n_fused.masked_fill(~filled, 0).numpy(), route_p)


def user_profiles(run: LoadedRun, histories: Sequence[tuple[np.ndarray, np.ndarray]], users: np.ndarray,
                  scoring: dict[str, Any], specs: list[PriorSpec], exclude_history: bool = True
                  ) -> list[dict[str, dict[str, float]]]:
    """Per history: {prior: {group: p(group | history)}}, largest first (`decode.interest_profile`)."""
    split = _as_split(histories, users, int(run.windows.params["context"]))
    prof = interest_profile(run, split, scoring, specs, exclude_history)
    out = []
    for r in range(len(histories)):
        per = {}
        for s in specs:
            row = prof[s.name][r]
            per[s.name] = {s.group_names[g]: float(row[g]) for g in np.argsort(-row, kind="stable")}
        out.append(per)
    return out


def _route_probabilities(run: LoadedRun, split: dict[str, np.ndarray], heads: torch.Tensor) -> np.ndarray:
    """p(k | h) [B, M] of each item's explaining head under the joint router (NaN where none)."""
    device = run.compat.omega.device
    parts = [log_p.cpu() for _, _, _, log_p in iter_queries(run.model, run.compat, split, batch_size=QUERY_BATCH,
                                                            device=device, route=True)]
    p = torch.cat(parts).exp().gather(1, heads.clamp(min=0))
    return p.masked_fill(heads < 0, float("nan")).numpy()


def _as_split(histories: Sequence[tuple[np.ndarray, np.ndarray]], users: np.ndarray, T: int
              ) -> dict[str, np.ndarray]:
    """Histories in the layout of a valid/test split (`mhr.windows.WindowsRef.read_split`): the last
    ≤ T interactions right-padded as context, the whole history (CSR) to exclude."""
    length = np.array([min(T, len(h)) for h, _ in histories], dtype=np.int64)
    items = np.zeros((len(histories), max(1, int(length.max()))), dtype=np.int64)
    ts = np.zeros_like(items)
    for r, (h_items, h_ts) in enumerate(histories):
        n = length[r]
        items[r, :n], ts[r, :n] = h_items[len(h_items) - n :], h_ts[len(h_ts) - n :]
    ptr = np.concatenate([[0], np.cumsum([len(h) for h, _ in histories])]).astype(np.int64)
    flat = np.concatenate([np.asarray(h, dtype=np.int64) for h, _ in histories])
    return {"user": np.asarray(users, dtype=np.int64), "items": items, "ts": ts, "length": length,
            "history_ptr": ptr, "history_items": flat}


def _explain(run: LoadedRun, split: dict[str, np.ndarray], items: torch.Tensor, winners: torch.Tensor,
             filled: torch.Tensor, scoring: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(head id, -1 = none; heads fused) [B, M] for the recommended `items` [B, M]: the head that
    won the item under a max-like fusion (the ranking's winners), else the largest term of the avg
    formula (`head_contributions`), which needs the head queries again (one more backbone pass)."""
    omega = run.compat.omega
    user_heads = run.compat.users(torch.from_numpy(split["user"]).to(omega.device)).cpu()
    allowed = omega[:, items].permute(1, 0, 2).cpu() & user_heads.unsqueeze(-1)  # [B, K, M]
    n_fused = allowed.sum(dim=1)
    if bool((winners[filled] >= 0).all()):
        return winners, n_fused
    vecs = run.model.item_vectors().float()
    params = {k: scoring.get(k) for k in ("weights", "scale", "offset")}
    heads = []
    for rows, q, _ in iter_queries(run.model, run.compat, split, batch_size=QUERY_BATCH, device=omega.device):
        r = torch.from_numpy(rows)
        scores = run.model.scorer(q, vecs[items[r].to(vecs.device)])  # [b, K, d] · [b, M, d] -> [b, K, M]
        heads.append(fusion_mod.head_contributions(scores, allowed[r], **params)[1].cpu())
    return torch.cat(heads), n_fused


def as_recommendations(ranked: TopK, row: int, meta: dict[int, tuple[str, str | None]],
                       names: Sequence[str]) -> list[Recommendation]:
    """Row `row` of a ranking as `Recommendation`s; `meta`: item id -> (raw id, title)."""
    n = int(ranked.filled()[row].sum())
    out = []
    for r in range(n):
        i, head = int(ranked.items[row, r]), int(ranked.heads[row, r])
        out.append(Recommendation(
            rank=r + 1, item_id=i, raw_id=meta[i][0], title=meta[i][1], score=float(ranked.scores[row, r]),
            head=names[head] if head >= 0 else None, heads_fused=int(ranked.heads_fused[row, r]),
            route_p=None if ranked.route_p is None or head < 0 else float(ranked.route_p[row, r]),
        ))
    return out


@torch.no_grad()
def recommend(run: LoadedRun, dataset: Dataset, raw_user: str, top: int = 10, fusion: str = "max",
              exclude_history: bool = True, fit: FusionFit | None = None, objectives: Objectives | None = None,
              profile: bool = False) -> tuple[list[Recommendation], dict[str, Any]]:
    """Rank the catalogue after the user's whole history (its last T interactions as context).

    `fusion`: max, avg, learned or invvar; a fitted fusion uses `fit` when given, else the run's
    cached fit (fitted on the validation split and written on first use, as `mhr eval` does).
    `objectives`: steer, boost or calibrate the list; `profile`: add the interest profile to the
    context (`"profile"`: {prior: {group: p(group | history)}}, `user_profiles`)."""
    check_fusion(fusion)
    resolved = resolve(objectives, run, dataset) if objectives is not None and objectives.active else None
    con = connect(dataset.store_path, read_only=True)
    try:
        row = con.execute("SELECT user_id FROM users WHERE raw_id = ?", [normalise_id(raw_user)]).fetchone()
        if row is None:
            sample = [r[0] for r in con.execute("SELECT raw_id FROM users ORDER BY user_id LIMIT 3").fetchall()]
            raise NotFoundError(
                f"user {raw_user!r} is not in dataset {dataset.name}",
                hint=f"pass a raw user id from the source data, e.g. {', '.join(sample)}",
            )
        user_id = int(row[0])
        scoring = scoring_for(run, fusion, fit)  # after the user check: a first fit takes a while
        hist = con.execute(
            "SELECT item_id, ts FROM interactions WHERE user_id = ? ORDER BY pos", [user_id]
        ).fetchnumpy()
        items_all = hist["item_id"].astype(np.int64)
        if len(items_all) == 0:
            raise NotFoundError(f"user {raw_user!r} has no interactions in dataset {dataset.name}")
        histories = [(items_all, hist["ts"].astype(np.int64))]
        ranked = rank_histories(run, histories, np.array([user_id]), top, scoring, exclude_history,
                                objectives=resolved)
        prof = user_profiles(run, histories, np.array([user_id]), scoring, profile_priors(run, dataset),
                             exclude_history)[0] if profile else None
        ids = [int(i) for i in ranked.items[0][ranked.filled()[0]]]
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
    recs = as_recommendations(ranked, 0, meta, run.layout.names)
    context = {"user": raw_user, "history_length": int(len(items_all)),
               "recent_titles": [t[0] for t in recent], "fusion": fusion}
    if fusion in FITTED:
        context["fitted_on"] = "valid"
    if resolved is not None:
        context["objectives"] = objectives_json(objectives)
    if prof is not None:
        context["profile"] = prof
    return recs, context


def objectives_json(objectives: Objectives) -> dict[str, Any]:
    out: dict[str, Any] = {"steer": [s.text() for s in objectives.steer], "boost": [b.text() for b in objectives.boost]}
    if objectives.calibrate:
        out |= {"calibrate": objectives.calibrate, "calibrate_lambda": objectives.calibrate_lambda}
    return out


def as_json(recs: list[Recommendation], context: dict[str, Any]) -> str:
    return json.dumps({**context, "items": [r.__dict__ for r in recs]}, indent=2)


# ---------------------------------------------------------------------------------------------
# every user: `mhr recommend RUN --all --out FILE`

EXPORT_SCHEMA = pa.schema([
    ("user", pa.string()),  # raw user id
    ("rank", pa.int32()),  # 1-based
    ("item", pa.string()),  # raw item id
    ("score", pa.float32()),  # fused score
    ("head", pa.string()),  # the explaining head (`Recommendation.head`); null without --explain
])
CHUNK_USERS = 1024
PROFILE_SCHEMA = pa.schema([  # `--all --explain`: the interest profiles, beside the export (`profile_path`)
    ("user", pa.string()),  # raw user id
    ("prior", pa.string()),  # an item or graph prior
    ("group", pa.string()),  # one of its groups
    ("p", pa.float32()),  # p(group | history), `mhr.ranking.decode.interest_profile`
])


def profile_path(out: Path) -> Path:
    """Where `--all --explain` writes the profiles: `recs.parquet` -> `recs.profile.parquet`."""
    out = Path(out)
    return out.with_name(out.stem + ".profile" + out.suffix)


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    users: int  # users with a list in the file
    skipped: int  # users without any interaction: nothing to rank after
    rows: int
    seconds: float


def read_user_file(path: Path) -> list[str]:
    """Raw user ids, one a line (blank lines and surrounding spaces ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the user file {path}: {e}", hint="one raw user id a line") from e
    users = [normalise_id(s) for s in lines if s.strip()]
    if not users:
        raise InputError(f"the user file {path} lists no user", hint="one raw user id a line")
    return users


def export_recommendations(run: LoadedRun, dataset: Dataset, out: Path, top: int = 10, fusion: str = "max",
                           explain: bool = False, exclude_history: bool = True, users: list[str] | None = None,
                           fit: FusionFit | None = None, chunk_users: int = CHUNK_USERS,
                           objectives: Objectives | None = None) -> ExportSummary:
    """Every user's (or `users`', raw ids) top `top` after their whole history, ranked exactly as
    `recommend` ranks one user, written to the Parquet file `out` (`EXPORT_SCHEMA`, rows by store
    user order then rank).

    Users go `chunk_users` at a time, so memory follows the chunk and the catalogue, not the number
    of users. The file is written beside `out` under a temporary name and renamed into place when
    complete: an interrupted export leaves `out` as it was (absent, or the previous export).
    `objectives`: steer, boost or calibrate every list. With `explain`, the users' interest profiles
    go to `profile_path(out)` (`PROFILE_SCHEMA`, one row per user, prior and group), written alike."""
    check_fusion(fusion)
    resolved = resolve(objectives, run, dataset) if objectives is not None and objectives.active else None
    out = check_output(Path(out))
    started = time.perf_counter()
    con = connect(dataset.store_path, read_only=True)
    try:
        chunks, total = _user_chunks(con, dataset, users, chunk_users)
        scoring = scoring_for(run, fusion, fit)
        raw_items = _raw_item_ids(con, run.model.item_vectors().shape[0])
        meta = {"run": run.name, "dataset": dataset.name, "fusion": fusion, "top": top,
                "exclude_history": exclude_history, "explain": explain}
        if resolved is not None:
            meta["objectives"] = objectives_json(objectives)
        schema = EXPORT_SCHEMA.with_metadata({"mhr": json.dumps(meta)})
        specs = profile_priors(run, dataset) if explain else []
        done = skipped = rows = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_parquet(out, schema) as writer, \
                (_atomic_parquet(profile_path(out), PROFILE_SCHEMA) if specs else nullcontext()) as prof_writer, \
                progress() as bar:
            task = bar.add_task("recommend", total=total, info="")
            for ids in chunks:
                table, ranked, prof = _export_chunk(run, con, ids, raw_items, top, scoring, exclude_history, explain,
                                                    resolved, specs)
                writer.write_table(table)
                if prof_writer is not None:
                    prof_writer.write_table(prof)
                done, skipped, rows = done + ranked, skipped + len(ids) - ranked, rows + table.num_rows
                bar.advance(task, len(ids))
    finally:
        con.close()
    seconds = time.perf_counter() - started
    err.print(f"{done} users, {rows} rows in {seconds:.1f} s ({done / max(seconds, 1e-9):.0f} users/s)"
              + (f"; {skipped} users without interactions skipped" if skipped else ""))
    return ExportSummary(out, done, skipped, rows, seconds)


def _user_chunks(con, dataset: Dataset, users: list[str] | None, size: int
                 ) -> tuple[Iterator[np.ndarray], int]:
    """(chunks of store user ids in ascending order, how many users in all). Every user by id
    ranges (user ids are 1..U), or the raw ids of `users`, all of which must exist."""
    if size < 1:
        raise UsageError(f"chunk size must be at least 1, got {size}")
    if users is None:
        lo, hi, n = con.execute("SELECT min(user_id), max(user_id), count(*) FROM users").fetchone()
        if not n:
            raise NotFoundError(f"dataset {dataset.name} has no users")
        return (np.arange(s, min(s + size, hi + 1)) for s in range(lo, hi + 1, size)), int(n)
    wanted = list(dict.fromkeys(users))
    found = con.execute("SELECT u.user_id FROM (SELECT unnest(?::VARCHAR[]) AS raw_id) JOIN users u USING (raw_id) "
                        "ORDER BY 1", [wanted]).fetchnumpy()["user_id"].astype(np.int64)
    if len(found) < len(wanted):
        missing = [r[0] for r in con.execute(
            "SELECT raw_id FROM (SELECT unnest(?::VARCHAR[]) AS raw_id) ANTI JOIN users USING (raw_id) LIMIT 5",
            [wanted]).fetchall()]
        raise NotFoundError(
            f"{len(wanted) - len(found)} of the {len(wanted)} users asked for are not in dataset "
            f"{dataset.name}, e.g. {', '.join(repr(m) for m in missing)}",
            hint="list raw user ids from the source data, one a line",
        )
    return (found[s : s + size] for s in range(0, len(found), size)), len(found)


def _raw_item_ids(con, n_cols: int) -> np.ndarray:
    """Object [N+1]: raw id by item id (None for the padding item 0)."""
    raw = np.full(n_cols, None, dtype=object)
    rows = con.execute("SELECT item_id, raw_id FROM items").fetchnumpy()
    raw[rows["item_id"].astype(np.int64)] = np.asarray(rows["raw_id"], dtype=object)
    return raw


def _export_chunk(run: LoadedRun, con, ids: np.ndarray, raw_items: np.ndarray, top: int,
                  scoring: dict[str, Any], exclude_history: bool, explain: bool, resolved: Resolved | None = None,
                  specs: Sequence[PriorSpec] = ()) -> tuple[pa.Table, int, pa.Table]:
    """(the rows of the users `ids`, how many were ranked, their profiles over `specs`): ascending store
    ids; ids that are no user (gaps in a range) or users without interactions are left out."""
    lo, hi, id_list = int(ids[0]), int(ids[-1]), ids.tolist()
    users = con.execute("SELECT user_id, raw_id FROM users WHERE user_id BETWEEN ? AND ? "
                        "AND user_id IN (SELECT unnest(?)) ORDER BY user_id", [lo, hi, id_list]).fetchnumpy()
    hist = con.execute("SELECT user_id, item_id, ts FROM interactions WHERE user_id BETWEEN ? AND ? "
                       "AND user_id IN (SELECT unnest(?)) ORDER BY user_id, pos", [lo, hi, id_list]).fetchnumpy()
    uid, h_uid = users["user_id"].astype(np.int64), hist["user_id"].astype(np.int64)
    start, stop = np.searchsorted(h_uid, uid), np.searchsorted(h_uid, uid, side="right")
    active = stop > start
    if not active.any():
        return EXPORT_SCHEMA.empty_table(), 0, PROFILE_SCHEMA.empty_table()
    items, ts = hist["item_id"].astype(np.int64), hist["ts"].astype(np.int64)
    histories = [(items[a:b], ts[a:b]) for a, b in zip(start[active], stop[active], strict=True)]
    ranked = rank_histories(run, histories, uid[active], top, scoring, exclude_history, explain, resolved)
    filled = ranked.filled()
    names = np.array([*run.layout.names, None], dtype=object)  # head -1 -> None
    raw_users = np.asarray(users["raw_id"], dtype=object)[active]
    prof = _profile_table(run, histories, uid[active], raw_users, scoring, specs, exclude_history)
    return pa.table({
        "user": pa.array(np.repeat(raw_users, filled.sum(axis=1)), pa.string()),
        "rank": pa.array(np.broadcast_to(np.arange(1, filled.shape[1] + 1, dtype=np.int32), filled.shape)[filled]),
        "item": pa.array(raw_items[ranked.items[filled]], pa.string()),
        "score": pa.array(ranked.scores[filled], pa.float32()),
        "head": pa.array(names[ranked.heads[filled]] if explain else [None] * int(filled.sum()), pa.string()),
    }, schema=EXPORT_SCHEMA), int(active.sum()), prof


def _profile_table(run: LoadedRun, histories, uid: np.ndarray, raw_users: np.ndarray, scoring: dict[str, Any],
                   specs: Sequence[PriorSpec], exclude_history: bool) -> pa.Table:
    if not specs:
        return PROFILE_SCHEMA.empty_table()
    split = _as_split(histories, uid, int(run.windows.params["context"]))
    prof = interest_profile(run, split, scoring, list(specs), exclude_history)
    cols: dict[str, list] = {"user": [], "prior": [], "group": [], "p": []}
    for s in specs:
        n_users, n_groups = prof[s.name].shape
        cols["user"].append(np.repeat(raw_users, n_groups))
        cols["prior"].append(np.full(n_users * n_groups, s.name, dtype=object))
        cols["group"].append(np.tile(np.asarray(s.group_names, dtype=object), n_users))
        cols["p"].append(prof[s.name].ravel().astype(np.float32))
    return pa.table({n: pa.array(np.concatenate(v), PROFILE_SCHEMA.field(n).type) for n, v in cols.items()},
                    schema=PROFILE_SCHEMA)


@contextmanager
def _atomic_parquet(out: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter on a temporary file beside `out`, renamed to `out` only after a clean exit;
    on any exception (Ctrl-C included) the temporary file is removed."""
    sweep_temps(out)  # what a killed export left
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = pq.ParquetWriter(tmp, schema)
    try:
        yield writer
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
