"""`mhr priors show`: what a prior looks like from the data, to help choose one.

Per group: its size and its share of items, of interactions and of targets (each user's last τ
interactions, the test targets of the windows). Overall: item coverage (items in no group — must
be 0, counted, not assumed), multi-label rate, label entropy of the interactions over groups,
concentration of users' histories (mean share of a user's history in their top group: high means
users stay in few groups, so per-group heads specialise), the share of users whose targets reach a
group absent from their history ("new interest"), and for Leiden priors the modularity. Everything
is SQL over the store, so it stays cheap on large logs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import duckdb

from mhr.errors import NotFoundError
from mhr.priors.kinds import EVENTS, HORIZON, ITEMS, USERS, prior_kind

TARGETS_CTE = """
t AS (SELECT user_id, item_id, event,
             pos > max(pos) OVER (PARTITION BY user_id) - $tau AS is_target
      FROM interactions)
"""


def _q(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> duckdb.DuckDBPyConnection:
    """Run `sql` with the named parameters it uses (DuckDB refuses unused ones)."""
    return con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})


def _entropy(counts: list[int]) -> tuple[float, float]:
    total = sum(counts)
    if total == 0:
        return 0.0, 0.0
    h = -sum(c / total * math.log2(c / total) for c in counts if c > 0)
    k = sum(1 for c in counts if c > 0)
    return h, (h / math.log2(k) if k > 1 else 0.0)


def _share(n: int | float, total: int | float) -> float:
    return round(n / total, 6) if total else 0.0


def _items(con: duckdb.DuckDBPyConnection, p: dict, groups: list[dict], out: dict) -> None:
    n_items = _q(con, "SELECT count(*) FROM items", p).fetchone()[0]
    sizes = dict(_q(con, "SELECT group_id, count(*) FROM item_groups WHERE prior = $prior GROUP BY 1", p).fetchall())
    labels = _q(con,
        "SELECT count(*) FILTER (WHERE n > 1), coalesce(avg(n), 0) FROM "
        "(SELECT item_id, count(DISTINCT group_id) AS n FROM item_groups WHERE prior = $prior GROUP BY 1)", p
    ).fetchone()
    uncovered = _q(con,
        "SELECT count(*) FROM items WHERE item_id NOT IN (SELECT item_id FROM item_groups WHERE prior = $prior)", p
    ).fetchone()[0]
    per = dict(
        (g, (a, b))
        for g, a, b in _q(con,
            f"WITH {TARGETS_CTE} SELECT g.group_id, count(*), count(*) FILTER (WHERE is_target) "
            "FROM t JOIN item_groups g ON g.item_id = t.item_id AND g.prior = $prior GROUP BY 1", {**p}
        ).fetchall()
    )
    totals = _q(con, f"WITH {TARGETS_CTE} SELECT count(*), count(*) FILTER (WHERE is_target) FROM t",
                         {"tau": p["tau"]}).fetchone()
    conc = _q(con,
        f"""WITH {TARGETS_CTE},
        h AS (SELECT user_id, item_id FROM t WHERE NOT is_target),
        n AS (SELECT user_id, count(*) AS n FROM h GROUP BY 1),
        ug AS (SELECT h.user_id, g.group_id, count(*) AS c FROM h
               JOIN item_groups g ON g.item_id = h.item_id AND g.prior = $prior GROUP BY 1, 2)
        SELECT avg(top / n) FROM (SELECT user_id, max(c) AS top FROM ug GROUP BY 1) JOIN n USING (user_id)""",
        p,
    ).fetchone()[0]
    new = _q(con,
        f"""WITH {TARGETS_CTE},
        lab AS (SELECT t.user_id, g.group_id, t.is_target FROM t
                JOIN item_groups g ON g.item_id = t.item_id AND g.prior = $prior),
        tg AS (SELECT DISTINCT user_id, group_id FROM lab WHERE is_target),
        hg AS (SELECT DISTINCT user_id, group_id FROM lab WHERE NOT is_target)
        SELECT count(DISTINCT user_id) FROM tg ANTI JOIN hg USING (user_id, group_id)""",
        p,
    ).fetchone()[0]
    n_users = _q(con, "SELECT count(DISTINCT user_id) FROM interactions", p).fetchone()[0]
    for g in groups:
        a, b = per.get(g["group_id"], (0, 0))
        g.update(items=int(sizes.get(g["group_id"], 0)), share_items=_share(sizes.get(g["group_id"], 0), n_items),
                 share_interactions=_share(a, totals[0]), share_targets=_share(b, totals[1]))
    h, hn = _entropy([per.get(g["group_id"], (0, 0))[0] for g in groups])
    out.update(
        items=n_items, items_without_group=int(uncovered), coverage=_share(n_items - uncovered, n_items),
        multi_label_rate=_share(labels[0], n_items), labels_per_item=round(float(labels[1]), 4),
        label_entropy_bits=round(h, 4), label_entropy_normalised=round(hn, 4),
        history_concentration=round(float(conc or 0.0), 4), new_interest_users=_share(new, n_users),
    )


def _events(con: duckdb.DuckDBPyConnection, p: dict, groups: list[dict], out: dict) -> None:
    rows = _q(con,
        f"""WITH {TARGETS_CTE} SELECT coalesce(e.group_id, -1), count(*), count(*) FILTER (WHERE is_target)
        FROM t LEFT JOIN event_groups e ON e.prior = $prior AND e.event IS NOT DISTINCT FROM t.event
        GROUP BY 1""",
        p,
    ).fetchall()
    per = {g: (a, b) for g, a, b in rows}
    total = sum(a for a, _ in per.values())
    targets = sum(b for _, b in per.values())
    for g in groups:
        a, b = per.get(g["group_id"], (0, 0))
        g.update(interactions=int(a), share_interactions=_share(a, total), share_targets=_share(b, targets))
    conc = _q(con,
        """WITH c AS (SELECT i.user_id, e.group_id, count(*) AS c FROM interactions i
                      JOIN event_groups e ON e.prior = $prior AND e.event IS NOT DISTINCT FROM i.event
                      GROUP BY 1, 2)
        SELECT avg(top / n) FROM (SELECT user_id, max(c) AS top, sum(c) AS n FROM c GROUP BY 1)""",
        {"prior": p["prior"]},
    ).fetchone()[0]
    h, hn = _entropy([per.get(g["group_id"], (0, 0))[0] for g in groups])
    out.update(interactions_without_group=int(per.get(-1, (0, 0))[0]), label_entropy_bits=round(h, 4),
               label_entropy_normalised=round(hn, 4), history_concentration=round(float(conc or 0.0), 4))


def _horizon(con: duckdb.DuckDBPyConnection, p: dict, groups: list[dict], out: dict) -> None:
    rows = dict(_q(con,
        'SELECT group_id, count(*) FROM horizon_groups WHERE prior = $prior GROUP BY 1', {"prior": p["prior"]}
    ).fetchall())
    spans = dict(
        (g, (lo, hi)) for g, lo, hi in _q(con,
            'SELECT group_id, min("offset"), max("offset") FROM horizon_groups WHERE prior = $prior GROUP BY 1',
            {"prior": p["prior"]}).fetchall()
    )
    tau = sum(rows.values())
    for g in groups:
        n = rows.get(g["group_id"], 0)
        g.update(offsets=f"{spans[g['group_id']][0]}-{spans[g['group_id']][1]}" if n else "-",
                 share_targets=_share(n, tau))
    out.update(horizon=tau)


def _users(con: duckdb.DuckDBPyConnection, p: dict, groups: list[dict], out: dict) -> None:
    n_users = _q(con, "SELECT count(*) FROM users", p).fetchone()[0]
    rows = _q(con,
        f"""WITH {TARGETS_CTE}, u AS (SELECT user_id, count(*) AS a, count(*) FILTER (WHERE is_target) AS b
                                    FROM t GROUP BY 1)
        SELECT g.group_id, count(*), coalesce(sum(a), 0), coalesce(sum(b), 0)
        FROM user_groups g LEFT JOIN u USING (user_id) WHERE g.prior = $prior GROUP BY 1""",
        p,
    ).fetchall()
    per = {g: (n, a, b) for g, n, a, b in rows}
    total_a = sum(a for _, a, _ in per.values()) or 1
    total_b = sum(b for _, _, b in per.values()) or 1
    for g in groups:
        n, a, b = per.get(g["group_id"], (0, 0, 0))
        g.update(users=int(n), share_users=_share(n, n_users), share_interactions=_share(a, total_a),
                 share_targets=_share(b, total_b))
    assigned = sum(n for n, _, _ in per.values())
    h, hn = _entropy([per.get(g["group_id"], (0, 0, 0))[0] for g in groups])
    out.update(users=n_users, users_without_group=int(n_users - assigned), label_entropy_bits=round(h, 4),
               label_entropy_normalised=round(hn, 4))


# what a kind maps -> the diagnostics of its groups
_BY_MAPPING = {ITEMS: _items, EVENTS: _events, HORIZON: _horizon, USERS: _users}


def describe(con: duckdb.DuckDBPyConnection, name: str, tau: int = 8) -> dict[str, Any]:
    """Diagnostics of prior `name` from the store's current rows (see the module docstring)."""
    row = con.execute("SELECT kind FROM priors WHERE prior = ?", [name]).fetchone()
    if row is None:
        built = ", ".join(r[0] for r in con.execute("SELECT prior FROM priors ORDER BY 1").fetchall()) or "none"
        raise NotFoundError(f"prior {name!r} is not built (built: {built})",
                            hint=f"build it with `mhr priors build --kind KIND --name {name}`")
    kind = row[0]
    groups = [
        {"group_id": int(g), "name": n}
        for g, n in con.execute(
            "SELECT group_id, name FROM prior_groups WHERE prior = ? ORDER BY group_id", [name]
        ).fetchall()
    ]
    out: dict[str, Any] = {"kind": kind, "n_groups": len(groups), "targets_per_user": tau}
    p = {"prior": name, "tau": tau}
    _BY_MAPPING[prior_kind(kind).maps](con, p, groups, out)
    out["groups"] = groups
    out["notes"] = notes(out)
    return out


def notes(d: dict[str, Any]) -> list[str]:
    """Plain-language remarks that bear on choosing this prior."""
    out = []
    shares = [g.get("share_targets", 0.0) for g in d["groups"]]
    maps = prior_kind(d["kind"]).maps
    if maps != HORIZON and shares and max(shares) > 0.6 and len(shares) > 1:
        big = d["groups"][shares.index(max(shares))]["name"]
        out.append(f"group {big!r} holds {100 * max(shares):.0f}% of the targets: heads are unbalanced")
    empty = [g["name"] for g, s in zip(d["groups"], shares, strict=True) if s == 0]
    if empty and maps != HORIZON:
        out.append(f"{len(empty)} groups receive no target (e.g. {empty[0]!r}): their heads never train on test-like data")
    if d.get("items_without_group"):
        out.append(f"{d['items_without_group']} items are in no group: no head can recommend them")
    if d.get("multi_label_rate", 0) > 0.5:
        out.append("most items carry several labels: heads overlap strongly")
    if maps == ITEMS and d.get("history_concentration", 0) > 0.7:
        out.append("users' histories concentrate in one group: per-group heads can specialise")
    if maps == ITEMS and d.get("new_interest_users", 0) > 0.3:
        out.append(f"{100 * d['new_interest_users']:.0f}% of users' targets reach a group absent from their history")
    return out


def show(con: duckdb.DuckDBPyConnection, name: str, tau: int = 8) -> dict[str, Any]:
    """Everything `mhr priors show --json` prints: stored params and build report + live diagnostics."""
    d = describe(con, name, tau)
    kind, params, key, report, created = con.execute(
        "SELECT kind, params, key, report, created FROM priors WHERE prior = ?", [name]
    ).fetchone()
    build = json.loads(report or "{}")
    build.pop("diagnostics", None)
    graph = build.get("graph") or {}
    if "modularity" in graph:
        d["modularity"] = graph["modularity"]
    return {"prior": name, "reference": f"prior:{name}", "kind": kind, "key": key, "created": str(created),
            "params": json.loads(params or "{}"), "build": build, "diagnostics": d}


def list_info(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    rows = con.execute(
        """SELECT p.prior, p.kind, p.key, p.created, count(g.group_id)
        FROM priors p LEFT JOIN prior_groups g USING (prior) GROUP BY ALL ORDER BY p.prior"""
    ).fetchall()
    return [{"prior": r[0], "kind": r[1], "key": r[2], "created": str(r[3]), "groups": int(r[4])} for r in rows]
