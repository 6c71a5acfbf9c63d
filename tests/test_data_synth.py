"""`mhr data synth` and `synth_store`: exact counts, determinism, and the planted structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mhr.data.synth import synth_store
from mhr.errors import UsageError
from mhr.workspace import Workspace
from tests.test_data_common import meta, mhr, ok, rows

SMALL = dict(users=300, items=120, interactions=12_000, communities=4, categories=6, segments=3, seed=3)


@pytest.fixture(scope="module")
def synth_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("synth")
    synth_store(Workspace(ws).dataset("s"), **SMALL)
    return ws


def test_counts_ids_and_pos(synth_ws: Path):
    assert rows(synth_ws, "s", "SELECT count(*), count(DISTINCT user_id), max(item_id) FROM interactions") == [
        (12_000, 300, 120)]
    assert rows(synth_ws, "s", "SELECT count(*) FROM items") == [(120,)]
    # pos is 0..n-1 per user and ts strictly increases with pos
    assert rows(synth_ws, "s", """
        SELECT count(*) FROM (SELECT user_id, pos, ts, lag(ts) OVER (PARTITION BY user_id ORDER BY pos) AS prev,
                                     row_number() OVER (PARTITION BY user_id ORDER BY pos) - 1 AS rn
                              FROM interactions) WHERE pos <> rn OR ts <= prev""") == [(0,)]
    assert meta(synth_ws, "s")["source"] == "synth"


def test_planted_truth_fields_and_recovery_signal(synth_ws: Path):
    # users mostly interact inside their planted community before drift_pos, and inside the recent one after
    before, after = rows(synth_ws, "s", """
        SELECT avg(CASE WHEN x.pos < CAST(u.attrs->>'drift_pos' AS INT)
                        THEN (CAST(i.attrs->>'community' AS INT) = CAST(u.attrs->>'community' AS INT))::INT END),
               avg(CASE WHEN x.pos >= CAST(u.attrs->>'drift_pos' AS INT)
                        THEN (CAST(i.attrs->>'community' AS INT) = CAST(u.attrs->>'recent_community' AS INT))::INT END)
        FROM interactions x JOIN users u USING (user_id) JOIN items i USING (item_id)""")[0]
    assert before > 0.8 and after > 0.8
    assert rows(synth_ws, "s", "SELECT count(*) FROM users WHERE attrs->>'community' = attrs->>'recent_community'") == [(0,)]
    # categories follow communities (multi-label tags, primary first)
    agree = rows(synth_ws, "s", """
        SELECT max(n) / sum(n) FROM (SELECT CAST(attrs->>'community' AS INT) c, tags[1] t, count(*) n FROM items GROUP BY 1, 2)
        GROUP BY c""")
    assert min(a for (a,) in agree) > 0.3
    assert rows(synth_ws, "s", "SELECT count(*) > 0 FROM items WHERE len(tags) = 2") == [(True,)]
    # segments and ages differ; events are rare as planted
    ages = [a for (a,) in rows(synth_ws, "s", "SELECT avg(CAST(attrs->>'age' AS INT)) FROM users GROUP BY attrs->>'segment' ORDER BY 1")]
    assert len(ages) == 3 and ages[-1] - ages[0] > 10
    shares = dict(rows(synth_ws, "s", "SELECT event, count(*) / 12000 FROM interactions GROUP BY event"))
    assert set(shares) == {"view", "like", "cart", "buy"} and shares["buy"] < 0.01 and shares["view"] > 0.85


def test_same_seed_same_store_other_seed_differs(synth_ws: Path, tmp_path: Path):
    again = Workspace(tmp_path).dataset("s")
    synth_store(again, **SMALL)
    q = "SELECT * FROM interactions ORDER BY user_id, pos"
    assert rows(tmp_path, "s", q) == rows(synth_ws, "s", q)
    assert rows(tmp_path, "s", "SELECT * FROM users") == rows(synth_ws, "s", "SELECT * FROM users")
    assert meta(tmp_path, "s")["data_key"] == meta(synth_ws, "s")["data_key"]
    assert synth_store(again, **SMALL).cached
    other = synth_store(Workspace(tmp_path).dataset("t"), **{**SMALL, "seed": 4})
    assert other.key != meta(synth_ws, "s")["data_key"]
    assert rows(tmp_path, "t", q) != rows(synth_ws, "s", q)


def test_cli_synth_and_show(workspace: Path):
    out = ok(workspace, "data", "synth", "--users", "50", "--items", "40", "--interactions", "2000", "--seed", "1")
    assert out == "dataset:synth\n"
    code, out, err = mhr(workspace, "data", "synth", "--users", "50", "--items", "40", "--interactions", "2000", "--seed", "1")
    assert code == 0 and "cached" in err and out == "dataset:synth\n"
    info = json.loads(ok(workspace, "data", "show", "--json"))
    assert info["interactions"] == 2000 and info["users"] == 50 and info["has_timestamps"]
    assert {e["event"] for e in info["events"]} <= {"view", "like", "cart", "buy"}


def test_bad_synth_parameters(workspace: Path):
    with pytest.raises(UsageError):
        synth_store(Workspace(workspace).dataset("x"), users=10, interactions=5)
    code, _, err = mhr(workspace, "data", "synth", "--communities", "1")
    assert code == 2 and "--communities" in err
