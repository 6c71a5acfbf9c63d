"""Prior kinds in one table: what each kind maps, its parameters and its builder.

A prior's groups map one thing — items, interaction events, horizon offsets or users — and that,
not the kind's name, decides how the rest of the code treats it: which store table holds the
mapping (`mhr.priors.groups`, `mhr.priors.spec.load_prior`), which items a head may score and which
targets train it (`mhr.models.heads.Compatibility`), its diagnostics (`mhr.priors.diagnostics`) and
how `mhr priors show` sizes a group. A new kind that reuses a mapping is one builder file (its
parameter dataclass and `build(con, params) -> PriorGroups`) and one line in `KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb

from mhr.errors import UsageError
from mhr.options import keyed_params
from mhr.priors.event import EventParams, build_event_prior
from mhr.priors.graph import GraphParams, build_graph_prior
from mhr.priors.groups import PriorGroups
from mhr.priors.item import ItemParams, build_item_prior, item_key_extras
from mhr.priors.temporal import TemporalParams, build_temporal_prior
from mhr.priors.user import UserParams, build_user_prior

# what a prior's groups map
ITEMS = "items"  # item -> groups (multi-label): a head scores only its group's items
EVENTS = "events"  # an interaction's raw event value -> group
HORIZON = "horizon"  # forecast offset 1..τ -> group
USERS = "users"  # user -> group: a user uses only their own group's heads
MAPPINGS = (ITEMS, EVENTS, HORIZON, USERS)


def _community_search(p: Any) -> dict[str, Any]:
    """Communities searched for a count: another search finds other communities, so another key."""
    if p.clusters is None:
        return {}
    from mhr.priors.coengagement import RESOLUTION_SEARCH

    return {"search": RESOLUTION_SEARCH}


@dataclass(frozen=True)
class PriorKind:
    maps: str  # one of MAPPINGS
    params: type  # the builder's parameter dataclass (its fields are `mhr priors build`'s options)
    build: Callable[[duckdb.DuckDBPyConnection, Any], PriorGroups]
    key_extras: Callable[[Any], dict[str, Any]] | None = None  # what the key covers beyond the params


# the one place a kind's name is resolved
KINDS: dict[str, PriorKind] = {
    "item": PriorKind(ITEMS, ItemParams, build_item_prior, item_key_extras),
    "graph": PriorKind(ITEMS, GraphParams, build_graph_prior, _community_search),
    "event": PriorKind(EVENTS, EventParams, build_event_prior),
    "temporal": PriorKind(HORIZON, TemporalParams, build_temporal_prior),
    "user": PriorKind(USERS, UserParams, build_user_prior, _community_search),
}
ITEM_KINDS = tuple(k for k, v in KINDS.items() if v.maps == ITEMS)  # kinds whose groups restrict Ω_k


def prior_kind(kind: str) -> PriorKind:
    """The kind's entry, or a UsageError listing the kinds."""
    if kind not in KINDS:
        raise UsageError(f"unknown prior kind {kind!r}", hint=f"use --kind with one of: {', '.join(KINDS)}")
    return KINDS[kind]


def key_params(kind: str, params: Any) -> dict[str, Any]:
    """What a prior's stage key covers: the kind, every parameter and the kind's extras (the resolution
    search's version when communities are searched for a count; for LLM consolidation the endpoint
    without credentials and the model — never the API key; a map file's sha256). A parameter added to a
    kind later is declared `option(…, added=True)`: at its default it stays out of the key, so the
    priors of existing stores keep theirs (tests/test_prior_keys.py pins them)."""
    entry = prior_kind(kind)
    extras = entry.key_extras(params) if entry.key_extras is not None else {}
    return {"kind": kind, **keyed_params(params), **extras}
