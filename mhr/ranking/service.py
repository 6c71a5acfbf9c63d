"""A trained run behind a service: load once, recommend for a raw history.

    from mhr import Recommender

    rec = Recommender.load("workspace", "ml-100k", "quickstart-both-s0")
    for r in rec.recommend(["50", "172", "181"], top=5, explain=True):
        print(r.rank, r.raw_id, r.title, f"{r.score:.3f}", r.head)

A history is a list of raw item ids (the source data's), oldest first, normalised as imports
normalise them (" 50", 50 and 50.0 name item "50"). It is ranked by
`mhr.ranking.recommend.rank_histories`, the path `mhr recommend` takes for a stored user, so a stored
user's whole history (with its timestamps and `user=`) gets exactly the CLI's list.

- Unknown raw item ids raise `NotFoundError` naming them (`unknown="skip"`: dropped, with a
  `UnknownItemsWarning`); an empty history is a `UsageError`.
- `timestamps` (seconds, as in the store) matter to time-aware backbones (HSTU); left out, the
  events are taken as one second apart, which is what a store without timestamps holds.
- `user` (a raw user id in the store) only selects the heads of user priors; its stored
  history is not added. Without it every head may score.
- The fusion is chosen at load: a fitted one (learned, invvar) is read from the run's cache (fitted
  on the validation split on first use, as `mhr eval` does) once, not per request.

The object holds no per-request state; the model stays in eval mode and runs without gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mhr.data.dense import normalise_id
from mhr.errors import NotFoundError, UsageError
from mhr.priors.spec import PriorSpec
from mhr.ranking.decode import Resolved, profile_priors, resolve
from mhr.ranking.objectives import Objectives
from mhr.ranking.recommend import (
    Recommendation,
    as_recommendations,
    check_fusion,
    rank_histories,
    scoring_for,
    user_profiles,
)
from mhr.store import connect
from mhr.training.runs import LoadedRun, load_run
from mhr.workspace import Dataset, Workspace


class UnknownItemsWarning(UserWarning):
    """Raw item ids of a history that are not in the catalogue (dropped under `unknown="skip"`)."""


@dataclass
class Recommender:
    run: LoadedRun = field(repr=False)
    dataset: Dataset
    fusion: str
    scoring: dict = field(repr=False)
    item_ids: dict[str, int] = field(repr=False)  # raw id -> item id
    meta: dict[int, tuple[str, str | None]] = field(repr=False)  # item id -> (raw id, title)
    _resolved: dict = field(default_factory=dict, repr=False)  # Objectives -> Resolved, looked up once

    @classmethod
    def load(cls, workspace: str | Path | None, dataset: str | None, run: str, fusion: str = "max",
             device: str = "cpu") -> Recommender:
        """The finished run `run` of `dataset` in `workspace` (None: `$MHR_WORKSPACE` or ./workspace;
        None dataset: `$MHR_DATASET` or the only one), its catalogue and fusion parameters."""
        check_fusion(fusion)
        ds = Workspace.from_option(workspace).dataset(dataset).require()
        loaded = load_run(ds, run.removeprefix("run:"), device=device)
        con = connect(ds.store_path, read_only=True)
        try:
            rows = con.execute("SELECT item_id, raw_id, title FROM items").fetchall()
        finally:
            con.close()
        return cls(loaded, ds, fusion, scoring_for(loaded, fusion), {r[1]: int(r[0]) for r in rows},
                   {int(r[0]): (r[1], r[2]) for r in rows})

    def recommend(self, history: Sequence[str], top: int = 10, explain: bool = True, *,
                  timestamps: Sequence[int] | None = None, user: str | None = None,
                  exclude_history: bool = True, unknown: str = "error",
                  objectives: Objectives | None = None) -> list[Recommendation]:
        """The top `top` items after `history` (raw item ids, oldest first), best first; with
        `explain`, each names its head (`Recommendation.head`, `heads_fused`). `objectives`: steer,
        boost or calibrate the list (`mhr.ranking.objectives`; unknown priors or groups: UsageError)."""
        resolved = self._resolve(objectives)
        items, ts = self._encode(history, timestamps, unknown)
        user_id = self._user_id(user) if user is not None else -1
        ranked = rank_histories(self.run, [(items, ts)], np.array([user_id]), top, self.scoring,
                                exclude_history, explain, objectives=resolved)
        return as_recommendations(ranked, 0, self.meta, self.run.layout.names)

    def profile(self, history: Sequence[str], *, timestamps: Sequence[int] | None = None,
                user: str | None = None, priors: Sequence[str] | None = None, exclude_history: bool = True,
                unknown: str = "error") -> dict[str, dict[str, float]]:
        """The interest profile after `history`: {prior: {group name: p(group | history)}}, largest
        first, per item prior (`priors`, default the run's item priors, else every item or graph prior
        of the store) — the mass of the run's softmax over the catalogue per group (router runs: the
        router's p(k | h) for the priors of its heads); `mhr.ranking.decode.interest_profile`."""
        items, ts = self._encode(history, timestamps, unknown)
        user_id = self._user_id(user) if user is not None else -1
        specs = profile_priors(self.run, self.dataset, list(priors) if priors else None)
        return user_profiles(self.run, [(items, ts)], np.array([user_id]), self.scoring, specs,
                             exclude_history)[0]

    def _resolve(self, objectives: Objectives | None) -> Resolved | None:
        if objectives is None or not objectives.active:
            return None
        if objectives not in self._resolved:
            self._resolved[objectives] = resolve(objectives, self.run, self.dataset)
        return self._resolved[objectives]

    def encode(self, history: Sequence[str], timestamps: Sequence[int] | None = None, unknown: str = "error"
               ) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, timestamps) of a raw history as `recommend` ranks it, checked as it checks it:
        what a caller that batches requests (`mhr serve`) validates each request with."""
        return self._encode(history, timestamps, unknown)

    def rank_encoded(self, histories: Sequence[tuple[np.ndarray, np.ndarray]], users: Sequence[int], top: int,
                     explain: bool = True, exclude_history: bool = True, objectives: Resolved | None = None
                     ) -> list[list[Recommendation]]:
        """Several `encode`d histories ranked in one `rank_histories` call (the path of `recommend`);
        `users`: store user ids for user priors' heads (-1: anonymous); `objectives`: resolved
        (`mhr.ranking.decode.resolve`) once by the caller. One list per history."""
        ranked = rank_histories(self.run, list(histories), np.asarray(users, dtype=np.int64), top, self.scoring,
                                exclude_history, explain, objectives=objectives)
        return [as_recommendations(ranked, r, self.meta, self.run.layout.names) for r in range(len(histories))]

    def profile_encoded(self, histories: Sequence[tuple[np.ndarray, np.ndarray]], users: Sequence[int],
                        specs: Sequence[PriorSpec] | None = None, exclude_history: bool = True
                        ) -> list[dict[str, dict[str, float]]]:
        """`profile` of several `encode`d histories in one pass; `specs`: the priors to cover (None:
        `profile`'s default, `mhr.ranking.decode.profile_priors`, looked up on every call)."""
        specs = list(specs) if specs is not None else profile_priors(self.run, self.dataset)
        return user_profiles(self.run, list(histories), np.asarray(users, dtype=np.int64), self.scoring, specs,
                             exclude_history)

    def _encode(self, history: Sequence[str], timestamps: Sequence[int] | None, unknown: str
                ) -> tuple[np.ndarray, np.ndarray]:
        if unknown not in ("error", "skip"):
            raise UsageError(f"unknown={unknown!r}", hint='use "error" or "skip"')
        if isinstance(history, str):
            raise UsageError("history must be a list of raw item ids, not one string")
        ts = np.zeros(len(history), np.int64) if timestamps is None else np.asarray(timestamps, np.int64)
        if len(ts) != len(history):
            raise UsageError(f"{len(history)} items but {len(ts)} timestamps", hint="one timestamp per item")
        ids = np.array([self.item_ids.get(normalise_id(raw), 0) for raw in history], dtype=np.int64)
        missing = [raw for raw, i in zip(history, ids, strict=True) if i == 0]
        if missing and unknown == "error":
            raise NotFoundError(
                f"{len(missing)} item(s) of the history are not in dataset {self.dataset.name}: "
                + ", ".join(repr(m) for m in missing[:5]),
                hint='pass raw item ids from the source data, or unknown="skip" to drop them',
            )
        if missing:
            warnings.warn(f"dropped {len(missing)} unknown item(s): {', '.join(map(repr, missing[:5]))}",
                          UnknownItemsWarning, stacklevel=3)
        keep = ids > 0
        if not keep.any():
            raise UsageError("the history holds no known item", hint="pass at least one raw item id")
        # without timestamps the kept events are one second apart, as in a store without them
        return ids[keep], ts[keep] if timestamps is not None else np.arange(int(keep.sum()), dtype=np.int64)

    def _user_id(self, raw_user: str) -> int:
        con = connect(self.dataset.store_path, read_only=True)
        try:
            row = con.execute("SELECT user_id FROM users WHERE raw_id = ?", [normalise_id(raw_user)]).fetchone()
        finally:
            con.close()
        if row is None:
            raise NotFoundError(f"user {raw_user!r} is not in dataset {self.dataset.name}",
                                hint="pass a raw user id from the source data, or no user")
        return int(row[0])
