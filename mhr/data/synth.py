"""Synthetic logs with planted structure that the priors should recover (`mhr data synth`).

What is planted, and where the truth is recorded (field names are a contract for tests):

- item communities: every item belongs to one co-engagement community; users draw most items
  from one community at a time. Truth: `items.attrs` -> `{"community": int, "category": int}`.
- item categories (multi-label): each community has its own few categories, so categories agree
  with communities but are not the same partition; every item has a primary category
  (`attrs.category`) and some a second one. Stored as `items.tags`, e.g. `["cat-03", "cat-07"]`.
- user segments: `users.attrs.segment` (int); each segment prefers its own communities, and its
  users' ages differ (`users.attrs.age`).
- short- vs long-term drift: a user's history before position `users.attrs.drift_pos` comes from
  community `users.attrs.community` (long-term interest); from `drift_pos` on it comes from
  `users.attrs.recent_community` (short-term interest, always a different community).
- event types with realistic rarity: `view` ≈ 90.5 %, `like` ≈ 7 %, `cart` ≈ 2 %, `buy` ≈ 0.5 %.
- noise: a fraction `noise` of interactions are random items drawn by global popularity.

Generation streams: users are produced in blocks of about `BATCH_ROWS` interactions with numpy,
handed to DuckDB as Arrow batches and appended to the store, so memory stays bounded from a few
thousand to ≥ 50M interactions. Same parameters and seed → the same store, bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import duckdb
import numpy as np
import pyarrow as pa

from mhr.console import progress
from mhr.data.ingest import BuildResult, build_store
from mhr.errors import UsageError
from mhr.workspace import Dataset

EVENTS = ("view", "like", "cart", "buy")
EVENT_P = (0.905, 0.07, 0.02, 0.005)
BATCH_ROWS = 1_000_000
T0 = 1_600_000_000  # 2020-09-13: the first user's history starts within a year after this
VERSION = 1


@dataclass(frozen=True)
class SynthParams:
    users: int = 1000
    items: int = 500
    interactions: int = 50_000
    communities: int = 8
    categories: int = 12
    segments: int = 4
    drift: float = 0.3
    noise: float = 0.15
    seed: int = 0

    def check(self) -> None:
        if self.users < 1 or self.items < 2:
            raise UsageError("--users must be >= 1 and --items >= 2")
        if self.interactions < self.users:
            raise UsageError(f"--interactions ({self.interactions}) must be >= --users ({self.users})",
                             hint="every user needs at least one interaction")
        if not 2 <= self.communities <= self.items:
            raise UsageError("--communities must be between 2 and --items")
        if self.categories < 1 or self.segments < 1:
            raise UsageError("--categories and --segments must be >= 1")
        if not (0 <= self.drift < 1 and 0 <= self.noise <= 1):
            raise UsageError("--drift must be in [0, 1) and --noise in [0, 1]")


def synth_store(dataset: Dataset, *, users: int = 1000, items: int = 500, interactions: int = 50_000,
                communities: int = 8, categories: int = 12, segments: int = 4, drift: float = 0.3,
                noise: float = 0.15, seed: int = 0, force: bool = False, discard_priors: bool = False) -> BuildResult:
    """Create `dataset` as a synthetic store with planted structure (cached on the parameters).

    Planted truth, for measuring recovery:
      items.attrs: {"community": int in [0, communities), "category": int in [0, categories)}
      items.tags:  ["cat-KK", ...] (primary category first; some items have a second one)
      users.attrs: {"segment": int in [0, segments), "age": int, "community": int,
                    "recent_community": int, "drift_pos": int}
      interactions.event in {"view", "like", "cart", "buy"}; ts in epoch seconds, strictly
      increasing within a user. Raw ids are "u<user_id>" and "i<item_id>".
    e.g. `SELECT item_id, CAST(attrs->>'community' AS INT) FROM items`.
    """
    p = SynthParams(users, items, interactions, communities, categories, segments, drift, noise, seed)
    p.check()
    params = {"generator": f"synth-v{VERSION}", **asdict(p)}
    return build_store(dataset, "data synth", params, {}, lambda con: _generate(con, p),
                       source="synth", has_timestamps=True, force=force, discard_priors=discard_priors)


def _generate(con: duckdb.DuckDBPyConnection, p: SynthParams) -> dict:
    rng = np.random.default_rng([p.seed, 0])
    comm = rng.permutation(np.arange(p.items) % p.communities)            # item -> community
    pop = rng.permutation(1.0 / np.arange(1, p.items + 1) ** 0.8)          # Zipf-like popularity
    category, second = _categories(rng, comm, p)
    _write_items(con, comm, category, second)

    seg = rng.integers(0, p.segments, p.users)
    long_c = _preferred_community(rng, seg, p)
    recent_c = (long_c + rng.integers(1, p.communities, p.users)) % p.communities
    lengths = _lengths(rng, p)
    drift_pos = np.floor(lengths * (1 - p.drift)).astype(np.int64)
    age = np.clip(np.round(20 + 9 * seg + rng.normal(0, 4, p.users)), 16, 90).astype(np.int64)
    start = T0 + rng.integers(0, 365 * 86400, p.users)
    _write_users(con, seg, age, long_c, recent_c, drift_pos)

    sampler = _CommunitySampler(comm, pop)
    block = max(1, BATCH_ROWS // max(1, p.interactions // p.users))
    with progress() as bar:
        task = bar.add_task("synth", total=p.interactions, info="")
        for b, lo in enumerate(range(0, p.users, block)):
            hi = min(p.users, lo + block)
            batch = _batch(np.random.default_rng([p.seed, 1, b]), lo, hi, lengths, drift_pos, long_c, recent_c,
                           start, sampler, p.noise)
            con.register("batch", batch)
            con.execute("INSERT INTO interactions SELECT user_id, item_id, ts, CAST(event AS VARCHAR), pos FROM batch")
            con.unregister("batch")
            bar.advance(task, batch.num_rows)
    return {"users": p.users, "items": p.items, "interactions": int(lengths.sum()),
            "notes": [f"planted: {p.communities} communities, {p.categories} categories, {p.segments} segments, "
                      f"drift in the last {p.drift:.0%} of each history, noise {p.noise:.0%}"]}


def _categories(rng: np.random.Generator, comm: np.ndarray, p: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """Primary category near the community's own block of categories (80 %), else anywhere; a
    second, different category for about 30 % of items (-1 = none)."""
    span = max(1, p.categories // p.communities)
    own = (comm * p.categories // p.communities + rng.integers(0, span, len(comm))) % p.categories
    category = np.where(rng.random(len(comm)) < 0.8, own, rng.integers(0, p.categories, len(comm)))
    other = (category + rng.integers(1, max(2, p.categories), len(comm))) % p.categories
    second = np.where((rng.random(len(comm)) < 0.3) & (p.categories > 1), other, -1)
    return category, second


def _preferred_community(rng: np.random.Generator, seg: np.ndarray, p: SynthParams) -> np.ndarray:
    """Segment s prefers communities c with c % segments == s (80 %); otherwise any community."""
    n = len(seg)
    own = (seg % p.communities) + p.segments * rng.integers(0, max(1, p.communities // p.segments + 1), n)
    own = np.where(own < p.communities, own, seg % p.communities)
    return np.where(rng.random(n) < 0.8, own, rng.integers(0, p.communities, n))


def _lengths(rng: np.random.Generator, p: SynthParams) -> np.ndarray:
    """Heavy-tailed history lengths that sum to exactly `interactions` (each ≥ min(5, mean))."""
    floor = max(1, min(5, p.interactions // p.users))
    w = rng.lognormal(0.0, 0.8, p.users)
    share = w / w.sum() * (p.interactions - floor * p.users)
    lengths = np.floor(share).astype(np.int64)
    rest = p.interactions - floor * p.users - int(lengths.sum())
    lengths[np.argsort(-(share - lengths), kind="stable")[:rest]] += 1
    return lengths + floor


class _CommunitySampler:
    """Popularity-weighted item draws within a community, vectorized with one searchsorted.

    Cumulative weights of each community's items are laid end to end and shifted by the community
    index, so a draw `c + u` (u uniform in [0, 1)) lands in community c's segment.
    """

    def __init__(self, comm: np.ndarray, pop: np.ndarray) -> None:
        order = np.lexsort((np.arange(len(comm)), comm))
        self.items = order + 1                                     # item ids sorted by community
        c = comm[order]
        w = pop[order]
        totals = np.bincount(c, weights=w)
        within = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)])[c]
        self.cum = c + within / totals[c]
        self.ends = np.cumsum(np.bincount(c, minlength=len(totals)))
        self.global_cum = np.cumsum(pop) / pop.sum()

    def draw(self, rng: np.random.Generator, community: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.cum, community + rng.random(len(community)), side="right")
        return self.items[np.minimum(idx, self.ends[community] - 1)]

    def draw_global(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cum, rng.random(n), side="right"), len(self.global_cum) - 1) + 1


def _batch(rng: np.random.Generator, lo: int, hi: int, lengths: np.ndarray, drift_pos: np.ndarray,
           long_c: np.ndarray, recent_c: np.ndarray, start: np.ndarray, sampler: _CommunitySampler,
           noise: float) -> pa.Table:
    lens = lengths[lo:hi]
    n = int(lens.sum())
    user = np.repeat(np.arange(lo, hi), lens)
    first = np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.arange(n) - first
    community = np.where(pos < drift_pos[user], long_c[user], recent_c[user])
    item = sampler.draw(rng, community)
    random = rng.random(n) < noise
    item[random] = sampler.draw_global(rng, int(random.sum()))
    gaps = np.round(rng.exponential(6 * 3600, n)).astype(np.int64) + 1
    cs = np.cumsum(gaps)
    ts = start[user] + cs - cs[first]
    event = np.searchsorted(np.cumsum(EVENT_P), rng.random(n), side="right").clip(0, len(EVENTS) - 1)
    return pa.table({
        "user_id": pa.array((user + 1).astype(np.int32)),
        "item_id": pa.array(item.astype(np.int32)),
        "ts": pa.array(ts.astype(np.int64)),
        "event": pa.DictionaryArray.from_arrays(pa.array(event.astype(np.int8)), pa.array(EVENTS)),
        "pos": pa.array(pos.astype(np.int32)),
    })


def _write_items(con: duckdb.DuckDBPyConnection, comm: np.ndarray, category: np.ndarray, second: np.ndarray) -> None:
    ids = np.arange(1, len(comm) + 1, dtype=np.int32)
    meta = pa.table({"item_id": ids, "community": comm.astype(np.int32), "category": category.astype(np.int32),
                     "second": second.astype(np.int32)})
    con.register("synth_items", meta)
    con.execute("""
        INSERT INTO items
        SELECT item_id, 'i' || item_id, 'Item ' || item_id || ' (community ' || community || ')', NULL,
               CASE WHEN second >= 0 THEN ['cat-' || lpad(CAST(category AS VARCHAR), 2, '0'),
                                           'cat-' || lpad(CAST(second AS VARCHAR), 2, '0')]
                    ELSE ['cat-' || lpad(CAST(category AS VARCHAR), 2, '0')] END,
               CAST(to_json(struct_pack(community := community, category := category)) AS VARCHAR)
        FROM synth_items ORDER BY item_id
    """)
    con.unregister("synth_items")


def _write_users(con: duckdb.DuckDBPyConnection, seg: np.ndarray, age: np.ndarray, long_c: np.ndarray,
                 recent_c: np.ndarray, drift_pos: np.ndarray) -> None:
    meta = pa.table({
        "user_id": np.arange(1, len(seg) + 1, dtype=np.int32), "segment": seg.astype(np.int32),
        "age": age.astype(np.int32), "community": long_c.astype(np.int32),
        "recent_community": recent_c.astype(np.int32), "drift_pos": drift_pos.astype(np.int32),
    })
    con.register("synth_users", meta)
    con.execute("""
        INSERT INTO users
        SELECT user_id, 'u' || user_id,
               CAST(to_json(struct_pack(segment := segment, age := age, community := community,
                                        recent_community := recent_community, drift_pos := drift_pos)) AS VARCHAR)
        FROM synth_users ORDER BY user_id
    """)
    con.unregister("synth_users")
