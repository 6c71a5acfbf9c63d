"""`mhr data show`: what is in a dataset's store, as a dict (for --json) and a rich table."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.table import Table

from mhr.store import connect, get_meta
from mhr.workspace import Dataset

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def describe(dataset: Dataset, top: int = 10) -> dict[str, Any]:
    """Counts, sequence-length quantiles, time span, events and top tags of the store."""
    con = connect(dataset.require().store_path, read_only=True)
    try:
        n_users, n_items, n_inter = con.execute(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM items), (SELECT count(*) FROM interactions)"
        ).fetchall()[0]
        qs = con.execute(
            f"SELECT quantile_disc(n, {list(QUANTILES)}), avg(n) FROM "
            "(SELECT count(*) AS n FROM interactions GROUP BY user_id)"
        ).fetchall()[0]
        has_ts = bool(get_meta(con, "has_timestamps", True))
        span = con.execute("SELECT min(ts), max(ts) FROM interactions").fetchall()[0]
        events = con.execute(
            "SELECT event, count(*) AS n FROM interactions GROUP BY event ORDER BY n DESC, event NULLS LAST"
        ).fetchall()
        tags = con.execute(
            "SELECT tag, count(*) AS n FROM (SELECT unnest(tags) AS tag FROM items) GROUP BY tag "
            "ORDER BY n DESC, tag LIMIT ?",
            [top],
        ).fetchall()
        n_tags, untagged = con.execute(
            "SELECT (SELECT count(DISTINCT tag) FROM (SELECT unnest(tags) AS tag FROM items)), "
            "(SELECT count(*) FROM items WHERE tags IS NULL OR len(tags) = 0)"
        ).fetchall()[0]
        info: dict[str, Any] = {
            "dataset": dataset.name,
            "reference": f"dataset:{dataset.name}",
            "source": get_meta(con, "source"),
            "data_key": get_meta(con, "data_key"),
            "users": n_users,
            "items": n_items,
            "interactions": n_inter,
            "sequence_length": {
                **{f"p{int(q * 100)}": v for q, v in zip(QUANTILES, qs[0] or [], strict=False)},
                "mean": qs[1],
            },
            "has_timestamps": has_ts,
            "events": [{"event": e, "count": n, "share": n / n_inter if n_inter else 0.0} for e, n in events],
            "tags": {"distinct": n_tags, "untagged_items": untagged, "top": [{"tag": t, "items": n} for t, n in tags]},
            "import_report": get_meta(con, "report", {}),
        }
        if has_ts:
            info["time_span"] = {"min": span[0], "max": span[1], "min_iso": _iso(span[0]), "max_iso": _iso(span[1]),
                                 "days": (span[1] - span[0]) / 86400 if span[0] is not None else None}
        else:
            info["time_span"] = None
            info["note"] = "no timestamps: ts is the position"
        return info
    finally:
        con.close()


def summary_table(info: dict[str, Any]) -> Table:
    table = Table(title=f"{info['reference']}  ({info['source']})", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("users / items", f"{info['users']:,} / {info['items']:,}")
    table.add_row("interactions", f"{info['interactions']:,}")
    sl = info["sequence_length"]
    table.add_row("sequence length", "  ".join(f"{k} {v:,.0f}" if k != "mean" else f"mean {v:,.1f}"
                                                 for k, v in sl.items() if v is not None))
    if info["time_span"]:
        s = info["time_span"]
        table.add_row("time span", f"{s['min_iso']} → {s['max_iso']} ({s['days']:,.0f} days)")
    else:
        table.add_row("time span", "[yellow]no timestamps: ts is the position[/]")
    events = info["events"]
    shown = ", ".join(f"{e['event'] if e['event'] is not None else '∅'} {e['count']:,} ({e['share']:.1%})"
                      for e in events[:8])
    table.add_row("events", shown + (f", … {len(events) - 8} more" if len(events) > 8 else ""))
    t = info["tags"]
    top = ", ".join(f"{x['tag']} {x['items']:,}" for x in t["top"])
    table.add_row("tags", f"{t['distinct']:,} distinct, {t['untagged_items']:,} items untagged" + (f"; top: {top}" if top else ""))
    report = info.get("import_report") or {}
    flagged = {k: v for k, v in report.items() if k not in ("users", "items", "interactions", "rows_read", "notes") and v}
    if flagged:
        table.add_row("import", ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in flagged.items()))
    for note in report.get("notes", []):
        table.add_row("note", note)
    return table


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def log_result(result: Any) -> None:
    """What a data stage (`mhr data fetch|import|synth`, or a recipe's data step) tells on stderr:
    cached, or the new store's summary and what was dropped or is missing."""
    from mhr.console import err

    if result.cached:
        err.print(f"cached: {result.reference} (data key {result.key[:12]})")
        return
    err.print(summary_table(describe(result.dataset)))
    report = result.report
    for key, label in (("duplicates", "duplicate (user, item, ts) rows"),
                       ("short_users_dropped", "users shorter than --min-history dropped"),
                       ("items_never_interacted", "items in the item table never occur"),
                       ("items_without_metadata", "interacted items have no metadata")):
        if report.get(key):
            extra = " (dropped)" if key == "duplicates" and report.get("duplicates_dropped") else ""
            err.print(f"[yellow]{report[key]:,} {label}{extra}[/]")
