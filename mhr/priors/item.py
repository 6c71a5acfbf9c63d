"""item prior: semantic categories of items, from `items.tags`. A category's head scores only the
category's items (an item may be in several).

Steps: (1) read each item's tags; a tag that is a category path ("Industrial & Scientific,Fasteners,
Staples"; levels split at commas not followed by a space, so "Clothing, Shoes & Jewelry" stays one
level) is cut to `level` (1 = top; shorter paths keep their deepest level); (2) tags declared
unknown (`unknown_tags`, e.g. "(no genres listed)") are dropped; (3) tags are consolidated into
categories — a hand-written map (`map_file`), an LLM (`llm = "openai"`), the bundled MiniLM encoder
(zero-shot into `categories`, or clustering into `n_categories`), or kept as they are; (4) with
`top`, only the `top` most frequent categories are kept and the rest form "other"; (5) items left
with no category go to every group (`untagged = "all"`, as the paper's "unknown" tag) or to an
"other" group. Every item ends up in at least one group.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from mhr.cache import file_sha256
from mhr.errors import InputError, UsageError
from mhr.options import join_names, option, split_names
from mhr.priors.groups import PriorGroups, pairs_from_membership

UNKNOWN_TAGS = ("unknown", "(no genres listed)", "(none)", "none", "n/a")
_LEVEL_SPLIT = re.compile(r",(?! )")


@dataclass(frozen=True)
class ItemParams:
    categories: tuple[str, ...] = option(
        (), "Target category names 'A,B,C' (MiniLM zero-shot, or the LLM's choices).", parse=split_names,
        show=join_names)
    n_categories: int | None = option(None, "Cluster tags into K categories named from member tags.")
    map_file: str | None = option(None, "Tag -> categories file (TOML or CSV).", flag="--map")
    llm: str | None = option(None, "'openai': consolidate with an OpenAI-compatible endpoint (OPENAI_BASE_URL, "
                             "OPENAI_API_KEY).")
    model: str | None = option(None, "LLM model name (not set: $OPENAI_MODEL, else gpt-4o-mini).")
    llm_base_url: str | None = option(None, "LLM endpoint (not set: $OPENAI_BASE_URL).", flag="--base-url")
    batch_size: int = option(40, "Tags per LLM request.")
    timeout: float = option(60.0, "Seconds per LLM request.")
    retries: int = option(4, "Attempts per LLM request.")
    threshold: float = option(0.5, "Zero-shot cosine threshold for extra labels.")
    template: str = option("{}", "Text around each tag/category for MiniLM, e.g. '{} movies'.")
    level: int | None = option(None, "Category-path level to use (1 = top).")
    top: int | None = option(None, "Keep the N most frequent categories, the rest -> 'other'.")
    untagged: str = option("all", "Items without a tag: all (every group) or other.")
    unknown_tags: tuple[str, ...] = option(UNKNOWN_TAGS, "Tags meaning 'unknown' (treated as no tag).",
                                           parse=split_names, show=join_names)

    def check(self) -> None:
        if self.untagged not in ("all", "other"):
            raise UsageError(f"--untagged {self.untagged!r} is not one of all, other")
        chosen = [x for x in (self.map_file, self.llm) if x]
        if len(chosen) > 1:
            raise UsageError("--map and --llm exclude each other", hint="pick one way to consolidate tags")
        if self.categories and self.n_categories:
            raise UsageError("--categories and --n-categories exclude each other")
        if self.map_file and (self.categories or self.n_categories):
            raise UsageError("--map already names the categories; drop --categories / --n-categories")
        if self.llm is not None and self.llm != "openai":
            raise UsageError(f"--llm {self.llm!r} is not supported", hint="use --llm openai (any OpenAI-compatible endpoint)")
        if self.llm and not (self.categories or self.n_categories):
            raise UsageError("--llm needs the target categories", hint="pass --categories A,B,C or --n-categories K")
        if self.n_categories is not None and self.n_categories < 1:
            raise UsageError("--n-categories must be ≥ 1")
        if self.level is not None and self.level < 1:
            raise UsageError("--level counts from 1 (the top level of a category path)")
        if self.top is not None and self.top < 1:
            raise UsageError("--top must be ≥ 1")
        if len(set(self.categories)) != len(self.categories):
            raise UsageError("--categories repeats a name")
        if "{}" not in self.template:
            raise UsageError(f"--template {self.template!r} has no '{{}}' for the tag", hint="e.g. '{} movies'")


def item_key_extras(p: ItemParams) -> dict[str, Any]:
    """Beyond the parameters, an item prior's key covers the map file's content and, for LLM
    consolidation, the endpoint (without credentials) and the model — never the API key."""
    out: dict[str, Any] = {}
    if p.map_file:
        path = Path(p.map_file)
        if not path.is_file():
            raise UsageError(f"--map {path}: no such file")
        out["map_sha256"] = file_sha256(path)
    if p.llm:
        from mhr.priors.llm import public_url

        out["llm_base_url"] = public_url(p.llm_base_url or os.environ.get("OPENAI_BASE_URL"))
        out["model"] = p.model or os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
    return out


def at_level(tag: str, level: int | None) -> str:
    if level is None:
        return tag.strip()
    parts = [p.strip() for p in _LEVEL_SPLIT.split(tag) if p.strip()]
    return parts[min(level, len(parts)) - 1] if parts else ""


def item_tags(con: duckdb.DuckDBPyConnection, p: ItemParams) -> tuple[np.ndarray, list[list[str]]]:
    """(item ids, cleaned tags per item): levels picked, unknown tags dropped, order kept."""
    rows = con.execute("SELECT item_id, coalesce(tags, []) FROM items ORDER BY item_id").fetchall()
    if not rows:
        raise InputError("the store has no items", hint="import a dataset first with `mhr data …`")
    unknown = {t.strip().lower() for t in p.unknown_tags}
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    tags = []
    for _, raw in rows:
        seen: list[str] = []
        for t in raw:
            t = at_level(t or "", p.level)
            if t and t.lower() not in unknown and t not in seen:
                seen.append(t)
        tags.append(seen)
    if not any(tags):
        raise InputError(
            "no item has a tag in this store (items.tags is empty"
            + (f" or only {', '.join(p.unknown_tags)})" if unknown else ")"),
            hint="import item tags (genres, categories), or use --kind graph for co-engagement communities",
        )
    return ids, tags


def read_map_file(path: Path) -> dict[str, list[str]]:
    """tag -> categories from TOML (`tag = ["A", "B"]` or `tag = "A"`, optionally under [map]) or
    CSV (`tag,category` rows, repeated for several categories; or `tag,"A;B"`)."""
    if not path.is_file():
        raise UsageError(f"--map {path}: no such file")
    text = path.read_text(encoding="utf-8")
    out: dict[str, list[str]] = {}
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"--map {path}: not valid TOML ({e})", hint='write lines like "Horror" = ["Dark"]') from None
        data = data.get("map", data)
        for tag, cats in data.items():
            cats = [cats] if isinstance(cats, str) else cats
            if not isinstance(cats, list) or not all(isinstance(c, str) and c.strip() for c in cats):
                raise InputError(f"--map {path}: tag {tag!r} must map to a name or a list of names")
            out[tag.strip()] = [c.strip() for c in cats]
        return out
    import csv

    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"--map {path}, row {n}: expected 'tag,category', got {row!r}")
        if n == 1 and row[0].strip().lower() == "tag":
            continue
        for c in row[1].split(";"):
            if c.strip() and c.strip() not in out.setdefault(row[0].strip(), []):
                out[row[0].strip()].append(c.strip())
    if not out:
        raise InputError(f"--map {path}: no 'tag,category' rows")
    return out


def _consolidate(
    con: duckdb.DuckDBPyConnection, p: ItemParams, freq: Counter
) -> tuple[dict[str, list[str]], list[str], dict]:
    """tag -> categories, the category names in group order, and a report."""
    tags = sorted(freq, key=lambda t: (-freq[t], t))
    if p.map_file:
        table = read_map_file(Path(p.map_file))
        mapping = {t: table[t] for t in tags if t in table}
        unmapped = [t for t in tags if t not in table]
        cats = list(dict.fromkeys(c for t in table for c in table[t]))
        return mapping, cats, {"method": "map", "unmapped_tags": unmapped}
    if p.llm == "openai":
        from mhr.priors.llm import consolidate_with_llm

        return consolidate_with_llm(con, tags, p)
    if p.categories:
        from mhr.priors.encoder import zero_shot

        mapping, scores = zero_shot(tags, list(p.categories), p.threshold, p.template)
        return mapping, list(p.categories), {"method": "minilm-zero-shot", "threshold": p.threshold,
                                             "best_similarity": scores}
    if p.n_categories:
        from mhr.priors.encoder import cluster_tags

        mapping, cats = cluster_tags(tags, [freq[t] for t in tags], p.n_categories, p.template)
        return mapping, cats, {"method": "minilm-clusters"}
    return {t: [t] for t in tags}, tags, {"method": "tags"}


def build_item_prior(con: duckdb.DuckDBPyConnection, p: ItemParams) -> PriorGroups:
    p.check()
    ids, tags = item_tags(con, p)
    freq = Counter(t for ts in tags for t in ts)
    mapping, cats, report = _consolidate(con, p, freq)
    per_item = [list(dict.fromkeys(c for t in ts for c in mapping.get(t, ()))) for ts in tags]
    size = Counter(c for cs in per_item for c in cs)
    report["tags"] = len(freq)
    names = [c for c in cats if size[c] > 0]
    empty = [c for c in cats if size[c] == 0]
    if not names:
        raise InputError(
            f"no item tag maps to any category ({report['method']})",
            hint="check --map / --categories against the tags (`mhr priors build --kind item` lists them)",
        )
    if p.top is not None and len(names) > p.top:
        names = sorted(names, key=lambda c: (-size[c], c))[: p.top]
        report["top"] = p.top
    kept = set(names)
    rest = [c for c in size if c not in kept]
    per_item = [[c for c in cs if c in kept] or (["other"] if cs else []) for cs in per_item]
    if rest and any("other" in cs for cs in per_item):
        names.append("other")
        report["merged_into_other"] = len(rest)
    untagged = [i for i, cs in enumerate(per_item) if not cs]
    if untagged and p.untagged == "other":
        if "other" not in names:
            names.append("other")
        for i in untagged:
            per_item[i] = ["other"]
    index = {c: g for g, c in enumerate(names)}
    item_col: list[int] = []
    group_col: list[int] = []
    for item_id, cs in zip(ids.tolist(), per_item, strict=True):
        gs = [index[c] for c in cs] if cs else list(range(len(names)))  # untagged -> all groups
        item_col.extend([item_id] * len(gs))
        group_col.extend(gs)
    groups = PriorGroups(names, item_pairs=pairs_from_membership(np.array(item_col), np.array(group_col)))
    assert set(np.unique(groups.item_pairs[0]).tolist()) == set(ids.tolist()), "an item is in no group"
    report["untagged_items"] = len(untagged)
    report["mapping"] = {t: mapping.get(t, []) for t in sorted(freq, key=lambda t: (-freq[t], t))[:500]}
    groups.report.update(report)
    if untagged:
        where = "every group" if p.untagged == "all" else "the 'other' group"
        groups.warn(f"{len(untagged)} items have no (known) tag: put in {where}")
    if report.get("unmapped_tags"):
        u = report["unmapped_tags"]
        groups.warn(f"{len(u)} tags are not in the map and were ignored (e.g. {', '.join(u[:5])})")
    if empty:
        groups.warn(f"categories with no item: {', '.join(empty)}")
    return groups
