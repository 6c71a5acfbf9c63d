"""`mhr priors build`: derive one prior instance into the store, as a cached stage.

The stage key is `stage_key("priors", {"kind": …, **params}, {"data": data_key})`; the build is
skipped when the store's `priors` row of that name has the same key. Otherwise the kind's builder
(one pure function per kind, found in `mhr.priors.kinds.KINDS`) computes the groups, and the old rows
of that name are replaced by the new ones — groups, mapping, the `priors` row with its
diagnostics, and a `stage_runs` row — in ONE transaction: a failure rolls back and leaves the
previous prior of that name intact. LLM answers are the one exception: they are committed to
`llm_cache` as they arrive, so a failed build keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import duckdb

from mhr.cache import stage_key
from mhr.console import err
from mhr.errors import UsageError, refuse_non_finite
from mhr.options import field_flag, flag_name
from mhr.priors.groups import PriorGroups, delete_prior, write_groups
from mhr.priors.kinds import ITEMS, KINDS, USERS, key_params, prior_kind
from mhr.store import connect, data_key, record_stage_run, rollback
from mhr.workspace import Dataset, check_name, writing

STAGE = "priors"
# the `mhr priors build` flags not spelled like the field they set (a recipe may use either), e.g.
# map -> map_file: from the declarations (`mhr.options.option(flag=…)`)
FLAG_FIELDS = {field_flag(f)[2:].replace("-", "_"): f.name
               for entry in KINDS.values() for f in dataclasses.fields(entry.params) if f.metadata.get("flag")}


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


def _flag(name: str) -> str:
    """The `mhr priors build` flag of parameter `name` (of any kind)."""
    inverse = {v: k for k, v in FLAG_FIELDS.items()}
    return flag_name(inverse.get(name, name))


def make_params(kind: str, options: dict[str, Any]) -> Any:
    """The kind's parameter dataclass from the options that were given (None = not given).

    An option that the kind does not take is a UsageError rather than silently ignored."""
    cls = prior_kind(kind).params
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    foreign = sorted(k for k in given if k not in fields)
    if foreign:
        flags = ", ".join(_flag(k) for k in foreign)
        raise UsageError(f"{flags} does not apply to --kind {kind}",
                         hint="see `mhr priors build --help` for the options of each kind")
    params = cls(**given)
    refuse_non_finite(params)  # a recipe or the Python API: the CLI's float options refuse them already
    return params


def _check(groups: PriorGroups, kind: str, con: duckdb.DuckDBPyConnection) -> None:
    """Invariants every kind must meet before anything is written."""
    g = len(groups.names)
    assert g > 0 and len(set(groups.names)) == g, f"{kind}: group names must be unique and non-empty"
    maps = KINDS[kind].maps
    if maps == ITEMS:
        ids, gids = groups.item_pairs
        assert gids.min() >= 0 and gids.max() < g
        n_items = con.execute("SELECT count(*) FROM items").fetchone()[0]
        covered = len(set(ids.tolist()))
        assert covered == n_items, f"{kind}: {n_items - covered} items are in no group"
    if maps == USERS:
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

    entry = prior_kind(kind)
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
                groups = entry.build(con, params)
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
