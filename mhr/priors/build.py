"""`mhr priors build`: derive one prior instance into the store, as a cached stage.

The stage key is `stage_key("priors", {"kind": …, **params}, {"data": data_key})`; the build is
skipped when the store's `priors` row of that name has the same key. Otherwise the kind's builder
(one pure function per kind, dispatched through `BUILDERS`) computes the groups, and the old rows
of that name are replaced by the new ones — groups, mapping, the `priors` row with its
diagnostics, and a `stage_runs` row — in ONE transaction: a failure rolls back and leaves the
previous prior of that name intact. LLM answers are the one exception: they are committed to
`llm_cache` as they arrive, so a failed build keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from mhr.cache import file_sha256, stage_key
from mhr.console import err
from mhr.errors import UsageError, refuse_non_finite
from mhr.priors.coengagement import RESOLUTION_SEARCH
from mhr.priors.event import EventParams, build_event_prior
from mhr.priors.graph import GraphParams, build_graph_prior
from mhr.priors.groups import PriorGroups, delete_prior, write_groups
from mhr.priors.item import ItemParams, build_item_prior
from mhr.priors.spec import KINDS
from mhr.priors.temporal import TemporalParams, build_temporal_prior
from mhr.priors.user import UserParams, build_user_prior
from mhr.store import connect, data_key, record_stage_run, rollback
from mhr.workspace import Dataset, check_name, writing

STAGE = "priors"
# the `mhr priors build` flags not spelled like the field they set (a recipe may use either)
FLAG_FIELDS = {"map": "map_file", "base_url": "llm_base_url"}

# kind -> (its parameters, its builder); the one place a kind name is resolved
BUILDERS: dict[str, tuple[type, Callable[[duckdb.DuckDBPyConnection, Any], PriorGroups]]] = {
    "item": (ItemParams, build_item_prior),
    "graph": (GraphParams, build_graph_prior),
    "event": (EventParams, build_event_prior),
    "temporal": (TemporalParams, build_temporal_prior),
    "user": (UserParams, build_user_prior),
}
assert tuple(BUILDERS) == KINDS


@dataclass(frozen=True)
class BuildResult:
    name: str
    kind: str
    key: str
    cached: bool
    report: dict[str, Any]

    @property
    def reference(self) -> str:
        return f"prior:{self.name}"


def make_params(kind: str, options: dict[str, Any]) -> Any:
    """The kind's parameter dataclass from the options that were given (None = not given).

    An option that the kind does not take is a UsageError rather than silently ignored."""
    if kind not in BUILDERS:
        raise UsageError(f"unknown prior kind {kind!r}", hint=f"use --kind with one of: {', '.join(KINDS)}")
    cls = BUILDERS[kind][0]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    foreign = sorted(k for k in given if k not in fields)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise UsageError(f"{flags} does not apply to --kind {kind}",
                         hint="see `mhr priors build --help` for the options of each kind")
    params = cls(**given)
    refuse_non_finite(params)  # a recipe or the Python API: the CLI's float options refuse them already
    return params


def key_params(kind: str, params: Any) -> dict[str, Any]:
    """What the stage key covers: the kind, every parameter, the resolution search's version when
    graph/user communities are searched for a count, and for LLM consolidation the endpoint (without
    credentials) and model — never the API key."""
    out = {"kind": kind, **dataclasses.asdict(params)}
    if kind in ("graph", "user") and params.clusters is not None:
        out["search"] = RESOLUTION_SEARCH  # another search finds other communities: another key
    if kind == "item":
        if params.map_file:
            path = Path(params.map_file)
            if not path.is_file():
                raise UsageError(f"--map {path}: no such file")
            out["map_sha256"] = file_sha256(path)
        if params.llm:
            from mhr.priors.llm import public_url

            out["llm_base_url"] = public_url(params.llm_base_url or os.environ.get("OPENAI_BASE_URL"))
            out["model"] = params.model or os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
    return out


def _check(groups: PriorGroups, kind: str, con: duckdb.DuckDBPyConnection) -> None:
    """Invariants every kind must meet before anything is written."""
    g = len(groups.names)
    assert g > 0 and len(set(groups.names)) == g, f"{kind}: group names must be unique and non-empty"
    if kind in ("item", "graph"):
        ids, gids = groups.item_pairs
        assert gids.min() >= 0 and gids.max() < g
        n_items = con.execute("SELECT count(*) FROM items").fetchone()[0]
        covered = len(set(ids.tolist()))
        assert covered == n_items, f"{kind}: {n_items - covered} items are in no group"
    if kind == "user":
        ids, gids = groups.user_pairs
        assert gids.min() >= 0 and gids.max() < g


def _existing(con: duckdb.DuckDBPyConnection, kind: str, params: Any, name: str
              ) -> tuple[str, dict[str, Any], dict[str, str], BuildResult | None]:
    """The stage key of prior `name` with `params` (and its key parameters and inputs), and the
    built prior when the store holds it with that key."""
    inputs = {"data": data_key(con)}
    kp = key_params(kind, params)
    key = stage_key(STAGE, kp, inputs)
    row = con.execute("SELECT key, report FROM priors WHERE prior = ?", [name]).fetchone()
    hit = BuildResult(name, kind, key, True, json.loads(row[1] or "{}")) if row is not None and row[0] == key else None
    return key, kp, inputs, hit


def build_prior(
    dataset: Dataset, kind: str, params: Any, name: str | None = None, force: bool = False
) -> BuildResult:
    """Build (or find cached) the prior `name` (default: the kind) of `dataset`."""
    from mhr.priors.diagnostics import describe

    if kind not in BUILDERS:
        raise UsageError(f"unknown prior kind {kind!r}", hint=f"use --kind with one of: {', '.join(KINDS)}")
    name = check_name(name or kind, "prior")
    if not force:  # a prior built already needs no write lock, so it never waits for another writer
        con = connect(dataset.require().store_path, read_only=True)
        try:
            hit = _existing(con, kind, params, name)[-1]
        finally:
            con.close()
        if hit is not None:
            return hit
    with writing(dataset.require(), "priors build"):
        con = connect(dataset.store_path)
        try:
            key, kp, inputs, hit = _existing(con, kind, params, name)
            if hit is not None and not force:
                return hit
            started = time.time()
            try:
                groups = BUILDERS[kind][1](con, params)
                _check(groups, kind, con)
                con.execute("BEGIN TRANSACTION")
                try:
                    delete_prior(con, name)
                    con.execute(
                        "INSERT INTO priors VALUES (?, ?, ?, ?, NULL, now())",
                        [name, kind, json.dumps(kp, sort_keys=True, default=str), key],
                    )
                    write_groups(con, name, groups)
                    report = {**groups.report, "seconds": round(time.time() - started, 3),
                              "diagnostics": describe(con, name)}
                    con.execute("UPDATE priors SET report = ? WHERE prior = ?",
                                [json.dumps(report, sort_keys=True, default=str), name])
                    record_stage_run(con, STAGE, key, kp, inputs, started)
                    con.execute("COMMIT")
                except BaseException:
                    rollback(con)
                    raise
            except Exception as e:
                try:
                    record_stage_run(con, STAGE, key, kp, inputs, started, status=f"failed: {type(e).__name__}")
                except duckdb.Error:
                    pass
                raise
            return BuildResult(name, kind, key, False, report)
        finally:
            con.close()


def log_result(result: BuildResult) -> None:
    """What `mhr priors build` (or a recipe's priors step) tells on stderr."""
    if result.cached:
        err.print(f"cached: {result.reference} (key {result.key[:12]})")
        return
    report = result.report
    d = report.get("diagnostics", {})
    err.print(f"built {result.reference}: {d.get('n_groups', '?')} groups in {report.get('seconds', 0):.1f} s"
              + (f", modularity {report['graph']['modularity']:.3f}" if "graph" in report else ""))
    for w in report.get("warnings", []):
        err.print(f"[yellow]warning:[/] {w}")
    err.print("[dim]see `mhr priors show " + result.name + "` for its diagnostics[/]")
