"""The HTTP API of `mhr serve` (FastAPI): one loaded run, its catalogue, a micro-batcher.

Routes (all JSON but `/`): `GET /recommend?user=&k=&explain=&keep_history=&profile=&steer=&boost=
&calibrate=&calibrate_lambda=`, `POST /recommend` (a raw history and the same options), `GET /users`
(raw ids), `GET /users/{user}` (history with titles and groups, interest profile), `GET /items/{item}`,
`GET /health`, `/docs` (the OpenAPI page), `/` (the page in `static/`).

Ranking goes through `Recommender.rank_encoded`, i.e. `mhr.ranking.recommend.rank_histories`, the
path of `mhr recommend` (objectives included: `mhr.ranking.decode.rank_objectives`), so a stored
user gets exactly the CLI's list. Errors are 4xx JSON `{"error", "field", "hint"}`: unknown user or
item 404; k out of range, a bad value, an unknown prior or group 422; a history over `MAX_HISTORY`
items 413; malformed JSON 400. Anything else is a 500 whose body names no more than the error's type
(the traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
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
from mhr.serve.work import RequestError, Service, Work, parse_objectives

MAX_HISTORY = 10_000  # items in a POSTed history; longer is a 413 (the model reads only the last T anyway)
MAX_BODY = 4 << 20  # bytes of a request body (a 10,000-item history of long ids fits); more is a 413 unread
HISTORY_SHOWN = 50  # latest history items described in a /recommend answer
STATIC = files("mhr.serve") / "static"


# parts of a validation error's location that name no field: where it came from, a union member's type
NOT_FIELDS = ("body", "query", "path", "str", "int", "float", "bool")


STEER_DOC = "PRIOR:GROUP=SHARE: at least SHARE of the list from GROUP (repeatable)"
BOOST_DOC = "PRIOR:GROUP=BETA: BETA added to GROUP's scores, or its heads' before fusion (repeatable)"
CALIBRATE_DOC = "PRIOR: re-rank the list towards the history's own mix of PRIOR's groups (Steck 2018)"


class HistoryRequest(BaseModel):
    """A raw history to rank after (oldest first), with the options of `GET /recommend`."""

    history: list[str | int] = Field(..., description=f"raw item ids, oldest first (at most {MAX_HISTORY})")
    timestamps: list[Annotated[int, Field(ge=-(2**62), le=2**62)]] | None = Field(
        None, description="seconds, one per item; left out: one second apart")
    user: str | None = Field(None, description="a raw user id: only selects the heads of user priors")
    k: int = Field(10, description="how many items")
    explain: bool = Field(True, description="name the head behind each item")
    keep_history: bool = Field(False, description="allow items of the history")
    unknown: str = Field("error", description='"error": unknown item ids are a 404; "skip": dropped')
    profile: bool = Field(False, description="add the interest profile p(group | history)")
    steer: list[str] = Field([], description=STEER_DOC)
    boost: list[str] = Field([], description=BOOST_DOC)
    calibrate: str | None = Field(None, description=CALIBRATE_DOC)
    calibrate_lambda: float = Field(0.5, description="0: the plain list .. 1: calibration alone")


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title="mhr serve", version="1", lifespan=lifespan,
                  description=f"Run `{service.rec.run.name}` of dataset `{service.catalogue.dataset}`: "
                  "recommendations explained by the head behind each item, steerable by group.")
    _errors(app)
    _routes(app, service)
    _ranking_routes(app, service)

    @app.middleware("http")
    async def body_cap(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return JSONResponse({"error": f"the request body holds {size} bytes, over the cap of {MAX_BODY}",
                                 "field": "body", "hint": f"send at most {MAX_HISTORY} history items"},
                                status_code=413)
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _routes(app: FastAPI, s: Service) -> None:
    """The page, health and browsing routes (users, items)."""
    cat = s.catalogue

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "run": s.rec.run.name, "dataset": cat.dataset, "fusion": s.rec.fusion,
                "items": s.n_items, "users": len(cat.users), "heads": list(s.rec.run.layout.names),
                "priors": {p.name: list(p.names) for p in cat.priors}, "max_history": MAX_HISTORY,
                "context": int(s.rec.run.windows.params["context"]), "objectives": ["steer", "boost", "calibrate"],
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
        profile = None
        if len(items):
            _, profile = await s.batcher.rank(items, ts, uid, 0, Work(profile=True))
        shown = [{**cat.describe(int(i)), "ts": int(t)} for i, t in zip(items[-limit:], ts[-limit:], strict=True)]
        return {"user": normalise_id(user), "length": int(len(items)), "history": shown, "profile": profile,
                "history_mix": cat.mix(items)}

    @app.get("/items/{item:path}")
    async def item(item: Annotated[str, Path(description="raw item id")]) -> dict[str, Any]:
        i = _lookup(cat.item, item, "item")
        omega = s.rec.run.compat.omega[:, i].cpu().numpy()
        return {**cat.describe(i), "heads": [n for n, ok in zip(s.rec.run.layout.names, omega, strict=True) if ok]}



def _ranking_routes(app: FastAPI, s: Service) -> None:
    """`GET /recommend` (a stored user) and `POST /recommend` (a raw history)."""
    cat = s.catalogue

    @app.get("/recommend")
    async def recommend_user(
        user: Annotated[str, Query(description="raw user id: ranked after the stored history")],
        k: Annotated[int, Query(description="how many items")] = 10,
        explain: bool = True, keep_history: bool = False,
        profile: Annotated[bool, Query(description="add the interest profile p(group | history)")] = False,
        steer: Annotated[list[str], Query(description=STEER_DOC)] = [],  # noqa: B006 (FastAPI copies it)
        boost: Annotated[list[str], Query(description=BOOST_DOC)] = [],  # noqa: B006
        calibrate: Annotated[str | None, Query(description=CALIBRATE_DOC)] = None,
        calibrate_lambda: Annotated[float, Query(description="0: the plain list .. 1: calibration alone")] = 0.5,
    ) -> dict[str, Any]:
        uid = _lookup(cat.user, user, "user")
        items, ts = cat.history(uid)
        if len(items) == 0:
            raise RequestError(404, "user", f"user {user!r} has no interactions to rank after")
        work = _work(s, _k(s, k), explain, keep_history, profile, steer, boost, calibrate, calibrate_lambda)
        return await _answer(s, items, ts, uid, _k(s, k), work, {"user": normalise_id(user)})

    @app.post("/recommend")
    async def recommend_history(body: HistoryRequest) -> dict[str, Any]:
        if len(body.history) > MAX_HISTORY:
            raise RequestError(413, "history", f"the history holds {len(body.history)} items, over the cap of "
                               f"{MAX_HISTORY}", hint=f"send the latest {MAX_HISTORY} or fewer")
        if body.unknown not in ("error", "skip"):
            raise RequestError(422, "unknown", f"unknown={body.unknown!r}", hint='use "error" or "skip"')
        k = _k(s, body.k)
        work = _work(s, k, body.explain, body.keep_history, body.profile, body.steer, body.boost, body.calibrate,
                     body.calibrate_lambda)
        uid = _lookup(cat.user, body.user, "user") if body.user is not None else -1
        try:
            items, ts = s.rec.encode(body.history, body.timestamps, body.unknown)
        except NotFoundError as e:
            raise RequestError(404, "history", e.message, e.hint) from None
        except MhrError as e:
            field = "timestamps" if "timestamp" in e.message else "history"
            raise RequestError(422, field, e.message, e.hint) from None
        return await _answer(s, items, ts, uid, k, work, {"user": body.user, "history_known": int(len(items))})


def _k(s: Service, k: int) -> int:
    if not 1 <= k <= s.n_items:
        raise RequestError(422, "k", f"k={k} is out of range", hint=f"ask for 1 to {s.n_items} items (the catalogue)")
    return k


def _work(s: Service, k: int, explain: bool, keep_history: bool, profile: bool, steer: list[str], boost: list[str],
          calibrate: str | None, calibrate_lambda: float) -> Work:
    objectives = parse_objectives(steer, boost, calibrate, calibrate_lambda)
    s.resolved(objectives)  # unknown priors and groups are this request's 422, before it joins a batch
    return Work(not keep_history, explain, objectives, k if objectives is not None else 0, profile)


def _lookup(find, raw: str, field: str) -> int:
    try:
        return find(raw)
    except NotFoundError as e:
        raise RequestError(404, field, e.message, e.hint) from None


def _objectives_json(work: Work) -> dict[str, Any] | None:
    o = work.objectives
    if o is None:
        return None
    return {"steer": [x.text() for x in o.steer], "boost": [x.text() for x in o.boost], "calibrate": o.calibrate,
            "calibrate_lambda": o.calibrate_lambda if o.calibrate else None}


async def _answer(s: Service, items: np.ndarray, ts: np.ndarray, uid: int, k: int, work: Work,
                  context: dict[str, Any]) -> dict[str, Any]:
    recs, profile = await s.batcher.rank(items, ts, uid, k, work)
    recs = recs[:k]
    cat = s.catalogue
    ids = np.array([r.item_id for r in recs], dtype=np.int64)
    return {**context, "k": k, "fusion": s.rec.fusion, "run": s.rec.run.name, "objectives": _objectives_json(work),
            "items": [{"rank": r.rank, **cat.describe(r.item_id), "score": r.score, "head": r.head,
                       "heads_fused": r.heads_fused} for r in recs],
            "exposure": cat.exposure(ids), "profile": profile, "history_mix": cat.mix(items),
            "history_length": int(len(items)), "history": [cat.describe(int(i)) for i in items[-HISTORY_SHOWN:]]}


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def field_error(request: Request, e: RequestError) -> JSONResponse:
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
