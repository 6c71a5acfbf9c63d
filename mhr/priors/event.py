"""event prior: interaction types, from `interactions.event`. A type's head may score every item and
is trained by the targets of that type.

Numeric events (MovieLens ratings) are bucketed by `buckets`, e.g.
"dislike:1-2,neutral:3,like:4,love:5" (the default when every event is a number in 1–5; ranges are
inclusive, so half stars 1.5 fall in 1-2). Otherwise each distinct event value is its own group.
NULL events form a group named "unknown". Rare types (< 1% of interactions) are kept and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from mhr.errors import InputError, UsageError
from mhr.options import option
from mhr.priors.groups import PriorGroups

RATING_BUCKETS = "dislike:1-2,neutral:3,like:4,love:5"
RARE_SHARE = 0.01


@dataclass(frozen=True)
class EventParams:
    buckets: str | None = option(
        None, f"Event buckets, e.g. '{RATING_BUCKETS}' (not set: that for 1–5 ratings, else one group per value).")


def parse_buckets(text: str) -> list[tuple[str, float, float]]:
    """"dislike:1-2,neutral:3" -> [("dislike", 1, 2), ("neutral", 3, 3)]."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, span = part.partition(":")
        lo_text, dash, hi_text = span.strip().partition("-")
        try:
            lo = float(lo_text)
            hi = float(hi_text) if dash else lo
        except ValueError:
            lo = hi = float("nan")
        if not sep or not name.strip() or np.isnan(lo) or np.isnan(hi) or hi < lo:
            raise UsageError(
                f"bad bucket {part!r} in --buckets",
                hint="write NAME:LOW-HIGH or NAME:VALUE, e.g. 'dislike:1-2,neutral:3,like:4,love:5'",
            )
        out.append((name.strip(), lo, hi))
    if not out:
        raise UsageError("--buckets is empty", hint=f"e.g. --buckets '{RATING_BUCKETS}'")
    names = [b[0] for b in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--buckets repeats a name: {text!r}")
    ordered = sorted(out, key=lambda b: (b[1], b[2]))
    for (n1, lo1, hi1), (n2, lo2, hi2) in zip(ordered, ordered[1:], strict=False):
        if lo2 <= hi1:  # ranges are inclusive: a value in both would silently go to the first
            raise UsageError(f"--buckets {n1!r} ({lo1:g}-{hi1:g}) and {n2!r} ({lo2:g}-{hi2:g}) overlap",
                             hint="give each event value one bucket, e.g. 'dislike:1-2,neutral:3,like:4,love:5'")
    return out


def _as_number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def build_event_prior(con: duckdb.DuckDBPyConnection, p: EventParams) -> PriorGroups:
    counts = con.execute(
        "SELECT event, count(*) FROM interactions GROUP BY event ORDER BY count(*) DESC, event"
    ).fetchall()
    total = sum(n for _, n in counts)
    if total == 0:
        raise InputError("the store has no interactions", hint="import a dataset first with `mhr data …`")
    values = [e for e, _ in counts if e is not None]
    if not values:
        raise InputError(
            "interactions.event is empty (NULL) for every interaction: there are no event types",
            hint="import the event column (e.g. ratings or view/click/buy), or use another prior kind",
        )
    numbers = {e: _as_number(e) for e in values}
    buckets = p.buckets
    if buckets is None and all(v is not None and 1 <= v <= 5 for v in numbers.values()):
        buckets = RATING_BUCKETS
    report: dict = {"buckets": buckets}
    if buckets is not None:
        spec = parse_buckets(buckets)
        names = [b[0] for b in spec]
        event_map: dict[str | None, int] = {}
        uncovered = []
        for e in values:
            x = numbers[e]
            hit = [g for g, (_, lo, hi) in enumerate(spec) if x is not None and lo <= x <= hi]
            if not hit:
                uncovered.append(e)
            else:
                event_map[e] = hit[0]
        if uncovered:
            raise UsageError(
                f"event values {', '.join(map(repr, uncovered[:8]))} fall in no bucket of {buckets!r}",
                hint="widen --buckets to cover them (ranges are inclusive: 'low:0.5-2')",
            )
    else:
        names = list(values)
        event_map = {e: g for g, e in enumerate(values)}
    if any(e is None for e, _ in counts):
        names.append("unknown")
        event_map[None] = len(names) - 1
    size = np.zeros(len(names), dtype=np.int64)
    for e, n in counts:
        size[event_map[e]] += n
    groups = PriorGroups(names, event_map=event_map, report=report)
    rare = [(names[g], int(size[g])) for g in range(len(names)) if size[g] < RARE_SHARE * total]
    empty = [names[g] for g in range(len(names)) if size[g] == 0]
    for name, n in rare:
        groups.warn(f"event group {name!r} is rare ({n} interactions, {100 * n / total:.2f}%): kept")
    if empty:
        groups.warn(f"bucket(s) {', '.join(empty)} match no interaction")
    return groups
