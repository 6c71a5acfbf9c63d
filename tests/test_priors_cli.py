"""`mhr priors build|show|list` end to end through the real CLI, the stage cache, and the
all-or-nothing write of a prior."""

from __future__ import annotations

import json

import pytest

import mhr.priors.build as build_mod
from mhr.priors.build import build_prior, make_params
from mhr.store import connect
from tests.test_priors_fixtures import make_store


def test_build_cached_show_list(tmp_path, cli):
    ws = tmp_path / "ws"
    make_store(ws)
    r = cli("priors", "build", "--kind", "graph", "--clusters", "4", "--name", "graph-4", workspace=ws)
    assert r.stdout == "prior:graph-4\n"
    assert "built prior:graph-4: 4 groups" in r.stderr
    r = cli("priors", "build", "--kind", "graph", "--clusters", "4", "--name", "graph-4", workspace=ws)
    assert r.stdout == "prior:graph-4\n" and "cached" in r.stderr
    r = cli("priors", "build", "--kind", "item", "--untagged", "other", workspace=ws)
    assert r.stdout == "prior:item\n"
    info = json.loads(cli("priors", "show", "item", "--json", workspace=ws).stdout)
    d = info["diagnostics"]
    assert info["kind"] == "item" and d["items_without_group"] == 0 and d["coverage"] == 1.0
    names = [g["name"] for g in d["groups"]]
    assert names[-1] == "other" and sum(g["items"] for g in d["groups"]) == 80
    assert abs(sum(g["share_targets"] for g in d["groups"]) - 1) < 1e-6  # single-label: shares add up
    assert 0 < d["label_entropy_normalised"] <= 1 and d["history_concentration"] > 0.5
    assert info["params"]["untagged"] == "other"
    g = json.loads(cli("priors", "show", "graph-4", "--json", workspace=ws).stdout)
    assert g["diagnostics"]["modularity"] > 0.3 and g["params"]["holdout"] == 16
    table = cli("priors", "show", "graph-4", workspace=ws)
    assert "modularity" in table.stderr and table.stdout == ""
    listed = json.loads(cli("priors", "list", "--json", workspace=ws).stdout)
    assert [p["prior"] for p in listed] == ["graph-4", "item"]
    con = connect(ws / "tiny" / "store.duckdb", read_only=True)
    runs = con.execute("SELECT stage, status FROM stage_runs").fetchall()
    con.close()
    assert runs == [("priors", "done"), ("priors", "done")]  # the cached run wrote nothing


def test_cli_errors(tmp_path, cli):
    ws = tmp_path / "ws"
    make_store(ws)
    r = cli("priors", "build", "--kind", "genre", workspace=ws, check=False)
    assert r.returncode == 2 and "unknown prior kind 'genre'" in r.stderr and r.stdout == ""
    r = cli("priors", "build", "--kind", "user", "--from-attributes", "income", workspace=ws, check=False)
    assert r.returncode == 2 and "income do not exist" in r.stderr and "age, gender" in r.stderr
    r = cli("priors", "show", "nope", workspace=ws, check=False)
    assert r.returncode == 3 and "not built" in r.stderr


def test_failed_build_leaves_the_older_prior_intact(tmp_path, monkeypatch):
    ds = make_store(tmp_path)
    build_prior(ds, "temporal", make_params("temporal", {}))
    before = _rows(ds)

    def half_then_fail(con, prior, groups):
        real_write(con, prior, groups)
        raise RuntimeError("disk full")

    real_write = build_mod.write_groups
    monkeypatch.setattr(build_mod, "write_groups", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_prior(ds, "temporal", make_params("temporal", {"segments": 4}))
    assert _rows(ds) == before
    con = connect(ds.store_path, read_only=True)
    status = con.execute("SELECT status FROM stage_runs ORDER BY started").fetchall()
    con.close()
    assert status[-1][0].startswith("failed")
    monkeypatch.setattr(build_mod, "write_groups", real_write)
    r = build_prior(ds, "temporal", make_params("temporal", {"segments": 4}))
    assert not r.cached and _rows(ds) != before


def _rows(ds):
    con = connect(ds.store_path, read_only=True)
    try:
        return (con.execute("SELECT prior, kind, key FROM priors").fetchall(),
                con.execute("SELECT * FROM prior_groups ORDER BY ALL").fetchall(),
                con.execute('SELECT * FROM horizon_groups ORDER BY ALL').fetchall())
    finally:
        con.close()
