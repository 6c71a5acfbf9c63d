"""The HTTP API of `mhr serve` (FastAPI): one loaded run, its catalogue, a micro-batcher.

Routes (all JSON but `/`): `GET /recommend?user=&k=&explain=&keep_history=`, `POST /recommend`
(a raw history), `GET /users` (raw ids), `GET /users/{user}` (history with titles and groups, interest
profile), `GET /items/{item}`, `GET /health`, `/docs` (OpenAPI page), `/` (the page in `static/`).

Ranking goes through `Recommender.rank_encoded`, i.e. `mhr.ranking.recommend.rank_histories`, the
path of `mhr recommend`: a stored user gets exactly the CLI's list. Errors are 4xx JSON
`{"error", "field", "hint"}`: unknown user or item 404; k out of range, a bad value 422; a history
over `MAX_HISTORY` items 413; malformed JSON 400. Anything else is a 500 whose body names no more
than the error's type (the traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from mhr.data.dense import normalise_id
from mhr.errors import MhrError, NotFoundError
from mhr.ranking.recommend import Recommendation
from mhr.ranking.service import Recommender
from mhr.serve.batcher import MicroBatcher
from mhr.serve.catalogue import Catalogue

MAX_HISTORY = 10_000  # items in a POSTed history; longer is a 413 (the model reads only the last T anyway)
HISTORY_SHOWN = 50  # latest history items described in a /recommend answer
STATIC = files("mhr.serve") / "static"


# parts of a validation error's location that name no field: where it came from, a union member's type
NOT_FIELDS = ("body", "query", "path", "str", "int", "float", "bool")


class FieldError(Exception):
    """A request the service refuses: HTTP `status`, the request `field` at fault, a message and a hint."""

    def __init__(self, status: int, field: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.hint = status, field, message, hint


@dataclass
class Service:
    """What the routes share: the run (`Recommender`), the store's catalogue and the batcher."""

    rec: Recommender
    catalogue: Catalogue
    batcher: MicroBatcher

    @classmethod
    def create(cls, rec: Recommender, max_batch: int = 64, wait_s: float = 0.002) -> Service:
        catalogue = Catalogue.load(rec.dataset, rec.run.priors)
        return cls(rec, catalogue, MicroBatcher(lambda h, u, top, key: _rank(rec, h, u, top, key), max_batch, wait_s))

    @property
    def n_items(self) -> int:
        return len(self.catalogue.raw_items) - 1


def _rank(rec: Recommender, histories: Sequence[tuple[np.ndarray, np.ndarray]], users: Sequence[int], top: int,
          key: Hashable) -> list[list[Recommendation]]:
    exclude_history, explain = key  # type: ignore[misc]
    return rec.rank_encoded(histories, users, top, explain=explain, exclude_history=exclude_history)


class HistoryRequest(BaseModel):
    """A raw history to rank after (oldest first)."""

    history: list[str | int] = Field(..., description=f"raw item ids, oldest first (at most {MAX_HISTORY})")
    timestamps: list[int] | None = Field(None, description="seconds, one per item; left out: one second apart")
    user: str | None = Field(None, description="a raw user id: only selects the heads of user priors")
    k: int = Field(10, description="how many items")
    explain: bool = Field(True, description="name the head behind each item")
    keep_history: bool = Field(False, description="allow items of the history")
    unknown: str = Field("error", description='"error": unknown item ids are a 404; "skip": dropped')


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title="mhr serve", version="1", lifespan=lifespan,
                  description=f"Run `{service.rec.run.name}` of dataset `{service.catalogue.dataset}`: "
                  "recommendations explained by the head behind each item.")
    _errors(app)
    _routes(app, service)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _routes(app: FastAPI, s: Service) -> None:
    cat = s.catalogue

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "run": s.rec.run.name, "dataset": cat.dataset, "fusion": s.rec.fusion,
                "items": s.n_items, "users": len(cat.users), "heads": list(s.rec.run.layout.names),
                "priors": {p.name: list(p.names) for p in cat.priors}, "max_history": MAX_HISTORY,
                "context": int(s.rec.run.windows.params["context"]),
                "batches": {"calls": s.batcher.calls, "requests": s.batcher.requests}}

    @app.get("/users")
    async def users(limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                    offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        return {"total": len(cat.raw_users), "users": cat.raw_users[offset: offset + limit]}

    @app.get("/users/{user:path}")
    async def user(user: Annotated[str, Path(description="raw user id")],
                   limit: Annotated[int, Query(ge=1, le=MAX_HISTORY, description="latest items shown")] = 50
                   ) -> dict[str, Any]:
        uid = _lookup(cat.user, user, "user")
        items, ts = cat.history(uid)
        shown = [{**cat.describe(int(i)), "ts": int(t)} for i, t in zip(items[-limit:], ts[-limit:], strict=True)]
        return {"user": normalise_id(user), "length": int(len(items)), "history": shown, "profile": cat.exposure(items)}

    @app.get("/items/{item:path}")
    async def item(item: Annotated[str, Path(description="raw item id")]) -> dict[str, Any]:
        i = _lookup(cat.item, item, "item")
        omega = s.rec.run.compat.omega[:, i].cpu().numpy()
        return {**cat.describe(i), "heads": [n for n, ok in zip(s.rec.run.layout.names, omega, strict=True) if ok]}

    @app.get("/recommend")
    async def recommend_user(
        user: Annotated[str, Query(description="raw user id: ranked after the stored history")],
        k: Annotated[int, Query(description="how many items")] = 10,
        explain: bool = True, keep_history: bool = False,
    ) -> dict[str, Any]:
        uid = _lookup(cat.user, user, "user")
        items, ts = cat.history(uid)
        if len(items) == 0:
            raise FieldError(404, "user", f"user {user!r} has no interactions to rank after")
        return await _answer(s, items, ts, uid, _k(s, k), explain, keep_history, {"user": normalise_id(user)})

    @app.post("/recommend")
    async def recommend_history(body: HistoryRequest) -> dict[str, Any]:
        if len(body.history) > MAX_HISTORY:
            raise FieldError(413, "history", f"the history holds {len(body.history)} items, over the cap of "
                             f"{MAX_HISTORY}", hint=f"send the latest {MAX_HISTORY} or fewer")
        if body.unknown not in ("error", "skip"):
            raise FieldError(422, "unknown", f"unknown={body.unknown!r}", hint='use "error" or "skip"')
        k = _k(s, body.k)
        uid = _lookup(cat.user, body.user, "user") if body.user is not None else -1
        try:
            items, ts = s.rec.encode(body.history, body.timestamps, body.unknown)
        except NotFoundError as e:
            raise FieldError(404, "history", e.message, e.hint) from None
        except MhrError as e:
            field = "timestamps" if "timestamp" in e.message else "history"
            raise FieldError(422, field, e.message, e.hint) from None
        return await _answer(s, items, ts, uid, k, body.explain, body.keep_history,
                             {"user": body.user, "history_known": int(len(items))})


def _k(s: Service, k: int) -> int:
    if not 1 <= k <= s.n_items:
        raise FieldError(422, "k", f"k={k} is out of range", hint=f"ask for 1 to {s.n_items} items (the catalogue)")
    return k


def _lookup(find, raw: str, field: str) -> int:
    try:
        return find(raw)
    except NotFoundError as e:
        raise FieldError(404, field, e.message, e.hint) from None


async def _answer(s: Service, items: np.ndarray, ts: np.ndarray, uid: int, k: int, explain: bool,
                  keep_history: bool, context: dict[str, Any]) -> dict[str, Any]:
    recs = await s.batcher.rank(items, ts, uid, k, (not keep_history, explain))
    cat = s.catalogue
    ids = np.array([r.item_id for r in recs], dtype=np.int64)
    return {**context, "k": k, "fusion": s.rec.fusion, "run": s.rec.run.name,
            "items": [{"rank": r.rank, **cat.describe(r.item_id), "score": r.score, "head": r.head,
                       "heads_fused": r.heads_fused} for r in recs],
            "exposure": cat.exposure(ids), "profile": cat.exposure(items), "history_length": int(len(items)),
            "history": [cat.describe(int(i)) for i in items[-HISTORY_SHOWN:]]}


def _errors(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError) -> JSONResponse:
        return JSONResponse({"error": e.message, "field": e.field, "hint": e.hint}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ()) if p not in NOT_FIELDS]
        field = ".".join(loc) or "body"
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"malformed JSON: {first.get('msg')}", "field": "body",
                                 "hint": "send a JSON object, e.g. {\"history\": [\"50\", \"172\"], \"k\": 10}"},
                                status_code=400)
        return JSONResponse({"error": f"{field}: {first.get('msg')}", "field": field,
                             "hint": "see /docs for the request's schema",
                             "detail": [{"field": ".".join(map(str, x.get("loc", ()))), "error": x.get("msg")}
                                        for x in errors]}, status_code=422)

    @app.exception_handler(MhrError)
    async def mhr_error(request: Request, e: MhrError) -> JSONResponse:
        status = 404 if isinstance(e, NotFoundError) else 422
        return JSONResponse({"error": e.message, "field": None, "hint": e.hint}, status_code=status)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(e).__name__})", "field": None,
                             "hint": "see the server's log"}, status_code=500)
