"""What a ranking request asks of the model, and the service that batches it (no web framework here).

A request becomes a `Work` (what must be equal for requests to share a scoring call) and an encoded
history; `Service.run` ranks a batch of them through `Recommender.rank_encoded` — the ranking path
of `mhr recommend` — and, when asked, `Recommender.profile_encoded` (the interest profile). The
decoding-time objectives (`mhr.ranking.objectives`: steer, boost, calibrate) are parsed and resolved
here, once per distinct set (a bounded cache: a page dragging a slider asks for many).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mhr.errors import MhrError
from mhr.priors.spec import PriorSpec
from mhr.ranking.decode import Resolved, profile_priors, resolve
from mhr.ranking.objectives import Objectives, objectives_from_texts
from mhr.ranking.recommend import Recommendation
from mhr.ranking.service import Recommender
from mhr.serve.batcher import MicroBatcher
from mhr.serve.catalogue import Catalogue

RESOLVED_CACHE = 256  # distinct objective sets kept resolved


class RequestError(Exception):
    """A request the service refuses: HTTP `status`, the request `field` at fault, a message and a hint."""

    def __init__(self, status: int, field: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.hint = status, field, message, hint


@dataclass(frozen=True)
class Work:
    """Requests with equal `Work` share one scoring call. `top` is 0 unless the objectives re-rank
    (a quota or a calibration of K items is not the prefix of one of more items)."""

    exclude_history: bool = True
    explain: bool = True
    objectives: Objectives | None = None
    top: int = 0
    profile: bool = False


def parse_objectives(steer: Sequence[str], boost: Sequence[str], calibrate: str | None,
                     calibrate_lambda: float) -> Objectives | None:
    """The request's objectives (None when it asks for none); a bad one is a 422 naming its field."""
    try:
        objectives = objectives_from_texts(steer, boost, calibrate, calibrate_lambda, flags=("steer", "boost"))
        objectives.check()
    except MhrError as e:
        raise RequestError(422, _field_of(e.message), e.message, e.hint) from None
    return objectives if objectives.active else None


def _field_of(message: str) -> str:
    for name in ("calibrate-lambda", "calibrate", "steer", "boost"):
        if message.startswith((name, f"--{name}")):
            return name.replace("-", "_")
    return "steer" if "steer" in message else "objectives"


@dataclass
class Service:
    """What the routes share: the run (`Recommender`), the store's catalogue, the batcher, and the
    priors the interest profile covers."""

    rec: Recommender
    catalogue: Catalogue
    batcher: MicroBatcher = field(init=False)
    profile_specs: list[PriorSpec] = field(init=False)
    max_batch: int = 64
    wait_s: float = 0.002
    _resolved: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.batcher = MicroBatcher(self.run, self.max_batch, self.wait_s)
        self.profile_specs = profile_priors(self.rec.run, self.rec.dataset)

    @classmethod
    def create(cls, rec: Recommender, max_batch: int = 64, wait_s: float = 0.002) -> Service:
        return cls(rec, Catalogue.load(rec.dataset, rec.run.priors), max_batch, wait_s)

    @property
    def n_items(self) -> int:
        return len(self.catalogue.raw_items) - 1

    def resolved(self, objectives: Objectives | None) -> Resolved | None:
        """The objectives looked up against the run and store (cached); unknown priors or groups: 422."""
        if objectives is None:
            return None
        with self._lock:
            if objectives in self._resolved:
                self._resolved.move_to_end(objectives)
                return self._resolved[objectives]
        try:
            res = resolve(objectives, self.rec.run, self.rec.dataset)
        except MhrError as e:
            raise RequestError(422, _field_of(e.message), e.message, e.hint) from None
        with self._lock:
            self._resolved[objectives] = res
            while len(self._resolved) > RESOLVED_CACHE:
                self._resolved.popitem(last=False)
        return res

    def run(self, histories: Sequence[tuple[np.ndarray, np.ndarray]], users: Sequence[int], top: int, work: Work
            ) -> list[tuple[list[Recommendation], dict | None]]:
        """One scoring call for a batch (the batcher's worker thread): per history (its list, best
        first, `top` long where the catalogue allows; its interest profile or None)."""
        lists: list[list[Recommendation]] = [[] for _ in histories]
        if top > 0:
            lists = self.rec.rank_encoded(histories, users, top, explain=work.explain,
                                          exclude_history=work.exclude_history,
                                          objectives=self.resolved(work.objectives))
        profiles: list[dict | None] = [None] * len(histories)
        if work.profile and self.profile_specs:
            profiles = list(self.rec.profile_encoded(histories, users, self.profile_specs, work.exclude_history))
        return list(zip(lists, profiles, strict=True))
