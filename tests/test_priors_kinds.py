"""Each prior kind on tiny stores with planted structure (library level)."""

from __future__ import annotations

import numpy as np
import pytest

from mhr.errors import InputError, UsageError
from mhr.priors.build import build_prior, make_params
from mhr.priors.spec import load_prior
from mhr.store import connect
from tests.test_priors_fixtures import make_store, nmi, planted_items, planted_users


def build(ds, kind, name=None, **options):
    return build_prior(ds, kind, make_params(kind, options), name=name)


def load(ds, name):
    con = connect(ds.store_path, read_only=True)
    try:
        return load_prior(con, name)
    finally:
        con.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------- item


def test_item_tags_as_they_are_untagged_in_every_group(tiny):
    r = build(tiny, "item")
    spec = load(tiny, "item")
    assert sorted(spec.group_names) == sorted(["Horror", "Comedy", "Romance", "Documentary"])
    m = spec.item_groups
    assert not m[:, 0].any() and m[:, 1:].any(axis=0).all()  # every item reachable
    untagged = [i for i in range(80) if i % 20 < 2]
    assert m[:, [i + 1 for i in untagged]].all()  # untagged -> all groups
    tagged = [i for i in range(80) if i % 20 >= 2]
    assert (m[:, [i + 1 for i in tagged]].sum(0) == 1).all()
    assert r.report["diagnostics"]["items_without_group"] == 0
    assert r.report["untagged_items"] == 8


def test_item_untagged_other_and_top(tiny):
    build(tiny, "item", name="item-other", untagged="other", top=2)
    spec = load(tiny, "item-other")
    assert len(spec.group_names) == 3 and spec.group_names[-1] == "other"
    assert (spec.item_groups[:, 1:].sum(0) == 1).all()  # single label, nothing lost
    # the two kept categories have the most items; the rest and the untagged are 'other'
    assert spec.item_groups[-1, 1:].sum() == 2 * 18 + 8


def test_item_category_paths_level_and_map_files(tmp_path):
    from mhr.store import new_store, set_meta

    ds_dir = tmp_path / "ws"
    from mhr.workspace import Workspace

    ds = Workspace(ds_dir).dataset("amz")
    paths = [
        ["Industrial & Scientific,Fasteners,Staples"],
        ["Industrial & Scientific,Lab Supplies"],
        ["Clothing, Shoes & Jewelry,Women,Dresses"],
        ["Clothing, Shoes & Jewelry,Men"],
        ["Miscellaneous"],
    ]
    with new_store(ds.store_path) as con:
        for i, tags in enumerate(paths):
            con.execute("INSERT INTO items VALUES (?, ?, '', '', ?, '{}')", [i + 1, f"i{i}", tags])
        con.execute("INSERT INTO users VALUES (1, 'u', '{}')")
        con.executemany("INSERT INTO interactions VALUES (1, ?, ?, NULL, ?)", [(i + 1, i, i) for i in range(5)])
        set_meta(con, data_key="k-amz")
    build(ds, "item", name="top", level=1, unknown_tags=("Miscellaneous",))
    spec = load(ds, "top")
    assert spec.group_names == ("Clothing, Shoes & Jewelry", "Industrial & Scientific")
    assert spec.item_groups[:, 5].all()  # the unknown-tag item is in every group
    build(ds, "item", name="deep", level=2, unknown_tags=("Miscellaneous",))
    assert set(load(ds, "deep").group_names) == {"Fasteners", "Lab Supplies", "Women", "Men"}
    toml = tmp_path / "map.toml"
    toml.write_text('Fasteners = ["Hardware"]\n"Lab Supplies" = ["Hardware", "Science"]\nWomen = "Fashion"\n')
    r = build(ds, "item", name="mapped", level=2, map_file=str(toml), unknown_tags=("Miscellaneous",))
    spec = load(ds, "mapped")
    assert spec.group_names == ("Hardware", "Science", "Fashion")
    assert spec.item_groups[:, 2].tolist() == [True, True, False]  # multi-label from the map
    assert spec.item_groups[:, 4].all()  # "Men" unmapped -> untagged -> every group
    assert any("not in the map" in w for w in r.report["warnings"])
    csv = tmp_path / "map.csv"
    csv.write_text("tag,category\nFasteners,Hardware\nLab Supplies,Hardware;Science\nWomen,Fashion\nMen,Fashion\n")
    build(ds, "item", name="csv", level=2, map_file=str(csv), unknown_tags=("Miscellaneous",), untagged="other")
    spec = load(ds, "csv")
    assert spec.group_names == ("Hardware", "Science", "Fashion", "other")
    assert spec.item_groups[3, 5] and spec.item_groups[:, 5].sum() == 1


def test_item_no_tags_is_a_clear_error(tmp_path):
    ds = make_store(tmp_path, tags=False)
    with pytest.raises(InputError, match="no item has a tag"):
        build(ds, "item")


def test_unknown_kind_and_foreign_option():
    with pytest.raises(UsageError, match="unknown prior kind 'genre'"):
        make_params("genre", {})
    with pytest.raises(UsageError, match="--clusters does not apply to --kind event"):
        make_params("event", {"clusters": 3})


# ---------------------------------------------------------------- event / temporal


def test_event_rating_buckets_by_default(tiny):
    r = build(tiny, "event")
    spec = load(tiny, "event")
    assert spec.group_names == ("dislike", "neutral", "like", "love")
    assert spec.event_groups == {"1": 0, "2": 0, "3": 1, "4": 2, "5": 3}
    assert r.report["buckets"] == "dislike:1-2,neutral:3,like:4,love:5"
    build(tiny, "event", name="coarse", buckets="low:1-3,high:4-5")
    assert load(tiny, "coarse").event_groups["3"] == 0
    with pytest.raises(UsageError, match="fall in no bucket"):
        build(tiny, "event", name="bad", buckets="low:1-2,high:4-5")
    with pytest.raises(UsageError, match="bad bucket"):
        build(tiny, "event", name="bad", buckets="low:x")


def test_event_types_rare_kept_null_unknown(tmp_path):
    ds = make_store(tmp_path, events="typed", n_users=8, length=200)
    con = connect(ds.store_path)
    con.execute("UPDATE interactions SET event = 'share' WHERE user_id = 1 AND pos = 3")
    con.execute("UPDATE interactions SET event = NULL WHERE user_id = 2 AND pos < 50")
    con.close()
    r = build(ds, "event")
    spec = load(ds, "event")
    assert spec.group_names == ("view", "buy", "share", "unknown")
    assert spec.event_groups[None] == 3 and spec.event_groups["share"] == 2
    assert any("'share' is rare" in w for w in r.report["warnings"])


def test_temporal_segments_and_boundaries(tiny):
    build(tiny, "temporal")
    spec = load(tiny, "temporal")
    assert spec.group_names == ("ST", "LT") and spec.horizon_groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    build(tiny, "temporal", name="t3", horizon=6, segments=3)
    spec = load(tiny, "t3")
    assert spec.group_names == ("seg1", "seg2", "seg3") and spec.horizon_groups.tolist() == [0, 0, 1, 1, 2, 2]
    build(tiny, "temporal", name="tb", boundaries=(2, 8))
    assert load(tiny, "tb").horizon_groups.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    with pytest.raises(UsageError, match="must increase"):
        build(tiny, "temporal", name="bad", boundaries=(5, 3))
    with pytest.raises(UsageError, match="--segments"):
        build(tiny, "temporal", name="bad", horizon=2, segments=3)


# ---------------------------------------------------------------- graph / user


def test_graph_recovers_planted_communities(tiny):
    r = build(tiny, "graph", clusters=4)
    spec = load(tiny, "graph")
    assert len(spec.group_names) == 4
    assert (spec.item_groups[:, 1:].sum(0) == 1).all()
    assert nmi(spec.item_groups[:, 1:].argmax(0), planted_items()) >= 0.9
    assert r.report["graph"]["modularity"] > 0.3
    con = connect(tiny.store_path, read_only=True)
    params = load_prior(con, "graph").params
    con.close()
    assert params["holdout"] == 16 and params["cap"] == 1000


def test_graph_unreachable_count_reports_closest(tiny):
    r = build(tiny, "graph", name="g50", clusters=50, min_size=5)
    spec = load(tiny, "g50")
    info = r.report["graph"]
    assert info["unreachable"] and info["clusters"] < 50
    assert len([n for n in spec.group_names if n != "other"]) == info["clusters"]
    assert any("cannot be reached" in w for w in r.report["warnings"])


def test_graph_isolated_items_other_or_all(tmp_path):
    ds = make_store(tmp_path, extra_items=3)  # items 81..83: nobody engages with them
    r = build(ds, "graph", clusters=4)
    spec = load(ds, "graph")
    assert spec.group_names[-1] == "other" and spec.item_groups[-1, 81:].all()
    assert r.report["graph"]["isolated"] == 3 and any("isolated" in w for w in r.report["warnings"])
    build(ds, "graph", name="g-all", clusters=4, isolated="all")
    spec = load(ds, "g-all")
    assert "other" not in spec.group_names and spec.item_groups[:, 81:].all()


def test_graph_leaks_nothing_from_held_out_interactions(tmp_path):
    """Changing only each user's last H interactions leaves the graph prior unchanged."""
    a = make_store(tmp_path / "a", seed=1)
    b = make_store(tmp_path / "b", seed=1)
    con = connect(b.store_path)
    # users' last 16 interactions now go to another community's items
    con.execute("UPDATE interactions SET item_id = ((item_id - 1 + 20 + pos) % 80) + 1 WHERE pos >= 40 - 16")
    con.close()
    build(a, "graph", clusters=4)
    build(b, "graph", clusters=4)
    assert np.array_equal(load(a, "graph").item_groups, load(b, "graph").item_groups)
    # the same change inside the training period does move the graph (the test can see a leak)
    c = make_store(tmp_path / "c", seed=1)
    con = connect(c.store_path)
    con.execute("UPDATE interactions SET item_id = ((item_id - 1 + 20 + pos) % 80) + 1 "
                "WHERE pos >= 40 - 32 AND pos < 40 - 16")
    con.close()
    build(c, "graph", clusters=4)
    assert not np.array_equal(load(a, "graph").item_groups, load(c, "graph").item_groups)


def test_user_graph_recovers_planted_segments(tiny):
    r = build(tiny, "user", clusters=4)
    spec = load(tiny, "user")
    assert (spec.user_groups[1:] >= 0).all()
    assert nmi(spec.user_groups[1:], planted_users()) >= 0.9
    assert r.report["diagnostics"]["users_without_group"] == 0


def test_user_from_attributes_and_missing_attribute(tiny):
    build(tiny, "user", name="demo", from_attributes=("age", "gender"), bins=2)
    spec = load(tiny, "demo")
    assert len(spec.group_names) == 4 and all("gender:" in n and "age:" in n for n in spec.group_names)
    assert (spec.user_groups[1:] >= 0).all()
    with pytest.raises(UsageError, match=r"occupation do not exist .*available: age, gender"):
        build(tiny, "user", name="bad", from_attributes=("occupation",))


def test_user_sampling_caps_users_per_item():
    from mhr.priors.user import sample_per_item

    users = np.arange(100)
    items = np.r_[np.zeros(90, int), np.ones(10, int)]
    keep = sample_per_item(users, items, 20, seed=0)
    assert keep[:90].sum() == 20 and keep[90:].all()
    assert np.array_equal(keep, sample_per_item(users, items, 20, seed=0))
