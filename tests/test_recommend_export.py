"""`mhr recommend --all` (every user to Parquet) and the service API on a tiny planted dataset."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import mhr.ranking.recommend as rec_mod
from mhr import Recommender
from mhr.cli import main
from mhr.errors import NotFoundError, UsageError
from mhr.ranking.recommend import EXPORT_SCHEMA, export_recommendations, recommend
from mhr.ranking.service import UnknownItemsWarning
from mhr.store import connect
from mhr.training.train import TrainParams, load_run, train
from mhr.windows import build_windows
from tests.helpers import make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=4, patience=0, lr=3e-3,
            warmup_steps=2, max_steps=8)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("rx") / "ws"
    ds = make_dataset(root, n_users=40)
    with connect(ds.store_path) as con:  # a user with no interaction: skipped by --all
        con.execute("INSERT INTO users VALUES (41, 'idle', '{}')")
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(priors=("temporal", "item"), **TINY), name="both", show_progress=False)
    return ds


def history(ds, raw_user: str) -> tuple[list[str], list[int]]:
    con = connect(ds.store_path, read_only=True)
    rows = con.execute("SELECT i.raw_id, x.ts FROM interactions x JOIN items i USING (item_id) "
                       "JOIN users u USING (user_id) WHERE u.raw_id = ? ORDER BY x.pos", [raw_user]).fetchall()
    con.close()
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def in_process(ds, *args: str) -> tuple[int, str, str]:
    """The real CLI (`mhr.cli.main`) without a subprocess: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["--workspace", str(ds.root), "--dataset", ds.name, *args])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def cli_json(ds, user: str, *extra: str) -> dict:
    code, out, err = in_process(ds, "recommend", "run:both", "--user", user, "--top", "5", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_export_all_equals_single_user_lists(trained, cli, tmp_path):
    out = tmp_path / "recs" / "recs.parquet"
    res = cli("--dataset", trained.name, "recommend", "run:both", "--all", "--out", str(out), "--top", "5",
              "--explain", workspace=trained.root)
    assert res.stdout.strip() == str(out)
    assert "40 users" in res.stderr and "1 users without interactions skipped" in res.stderr
    table = pq.read_table(out)
    assert table.schema.equals(EXPORT_SCHEMA, check_metadata=False)
    assert json.loads(table.schema.metadata[b"mhr"])["fusion"] == "max"
    rows = table.to_pylist()
    assert len(rows) == 40 * 5 and {r["user"] for r in rows} == {f"u{u}" for u in range(40)}
    names = load_run(trained, "both").layout.names
    assert all(r["head"] in names for r in rows)  # explanations present
    for user in ("u0", "u3", "u39"):
        mine = [r for r in rows if r["user"] == user]
        want = cli_json(trained, user)["items"]
        assert [r["rank"] for r in mine] == [1, 2, 3, 4, 5]
        assert [r["item"] for r in mine] == [w["raw_id"] for w in want]  # raw ids round-trip
        assert [r["head"] for r in mine] == [w["head"] for w in want]
        assert [r["score"] for r in mine] == pytest.approx([w["score"] for w in want], abs=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["recs.parquet", "recs.profile.parquet"]  # no temp left


def test_export_subset_fused_without_explain(trained, tmp_path):
    (tmp_path / "users.txt").write_text("u7\n\n u2 \nu7\n")
    out = tmp_path / "sub.parquet"
    code, stdout, err = in_process(trained, "recommend", "run:both", "--all", "--users", str(tmp_path / "users.txt"),
                                   "--out", str(out), "--top", "3", "--fusion", "avg")
    assert code == 0 and stdout.strip() == str(out), err
    rows = pq.read_table(out).to_pylist()
    assert [r["user"] for r in rows] == ["u2"] * 3 + ["u7"] * 3  # store order, duplicates once
    assert all(r["head"] is None for r in rows)
    want = cli_json(trained, "u7", "--fusion", "avg")["items"][:3]
    assert [r["item"] for r in rows[3:]] == [w["raw_id"] for w in want[:3]]
    (tmp_path / "bad.txt").write_text("u1\nnobody\n")
    code, stdout, err = in_process(trained, "recommend", "run:both", "--all", "--users", str(tmp_path / "bad.txt"),
                                   "--out", str(tmp_path / "bad.parquet"))
    assert code == 3 and "'nobody'" in err and not stdout
    assert not (tmp_path / "bad.parquet").exists()


def test_cli_refuses_unclear_requests(trained):
    for args in (("--all",), ("--user", "u1", "--all", "--out", "x.parquet"), ("--user", "u1", "--out", "x"), (),
                 ("--all", "--out", "x.parquet", "--json")):
        code, stdout, _ = in_process(trained, "recommend", "run:both", *args)
        assert code == 2 and not stdout, args


def test_interrupted_export_leaves_nothing_that_looks_complete(trained, tmp_path, monkeypatch):
    run = load_run(trained, "both")
    out = tmp_path / "recs.parquet"
    real, calls = rec_mod._export_chunk, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rec_mod, "_export_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        export_recommendations(run, trained, out, top=4, chunk_users=8)
    assert calls["n"] == 3 and list(tmp_path.iterdir()) == []  # no file at --out, no stray temp
    # a finished export stays whole when the next one is interrupted
    monkeypatch.setattr(rec_mod, "_export_chunk", real)
    summary = export_recommendations(run, trained, out, top=4, chunk_users=8)
    assert (summary.users, summary.skipped, summary.rows) == (40, 1, 160)
    before = out.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(rec_mod, "_export_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        export_recommendations(run, trained, out, top=2, chunk_users=8)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["recs.parquet"]


def test_chunking_does_not_change_the_export(trained, tmp_path, monkeypatch):
    run = load_run(trained, "both")
    monkeypatch.setattr(rec_mod, "QUERY_BATCH", 3)  # several backbone passes per chunk too
    a = export_recommendations(run, trained, tmp_path / "a.parquet", top=6, explain=True, chunk_users=7)
    b = export_recommendations(run, trained, tmp_path / "b.parquet", top=6, explain=True, chunk_users=1024)
    ta, tb = pq.read_table(a.path), pq.read_table(b.path)
    for col in ("user", "rank", "item", "head"):
        assert ta.column(col).to_pylist() == tb.column(col).to_pylist()
    assert np.allclose(ta.column("score").to_numpy(), tb.column("score").to_numpy(), atol=1e-5)


def test_api_equals_cli_for_a_stored_user(trained):
    service = Recommender.load(trained.root, trained.name, "run:both")
    items, ts = history(trained, "u3")
    got = service.recommend(items, top=5, explain=True, timestamps=ts, user="u3")
    want, _ = recommend(load_run(trained, "both"), trained, "u3", top=5)
    assert got == want  # the same ranking path, one user at a time
    from_cli = cli_json(trained, "u3")["items"]
    assert [r.raw_id for r in got] == [w["raw_id"] for w in from_cli]
    assert [r.head for r in got] == [w["head"] for w in from_cli]
    assert not set(r.raw_id for r in got) & set(items)  # history excluded
    plain = service.recommend(items, top=5, explain=False, timestamps=ts, user="u3")
    assert [r.raw_id for r in plain] == [r.raw_id for r in got] and all(r.head is None for r in plain)


def test_api_raw_histories(trained):
    service = Recommender.load(trained.root, trained.name, "both", fusion="learned")
    recs = service.recommend(["i1", "i4", "i7"], top=3)
    assert len(recs) == 3 and all(r.head and r.heads_fused >= 1 for r in recs)
    assert {r.raw_id for r in recs}.isdisjoint({"i1", "i4", "i7"})
    with pytest.raises(NotFoundError, match="'nope'"):
        service.recommend(["i1", "nope"])
    with pytest.warns(UnknownItemsWarning, match="'nope'"):
        skipped = service.recommend(["i1", "nope", "i4", "i7"], top=3, unknown="skip")
    assert skipped == recs
    with pytest.raises(UsageError, match="no known item"):
        service.recommend([])
    with pytest.raises(UsageError, match="timestamps"):
        service.recommend(["i1"], timestamps=[1, 2])
    with pytest.raises(NotFoundError, match="user 'nobody'"):
        service.recommend(["i1"], user="nobody")
    with pytest.raises(UsageError, match="unknown fusion"):
        Recommender.load(trained.root, trained.name, "both", fusion="median")


def test_readme_api_example_runs(trained, capsys):
    """The README's Python example, pointed at the tiny workspace."""
    section = README.read_text().split("### 6. Recommend", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = (code.replace('"workspace"', repr(str(trained.root))).replace('"ml-100k"', repr(trained.name))
            .replace('"quickstart-both-s0"', '"both"'))
    code = re.sub(r'\["[^\]]*"\]', '["i1", "i4", "i7"]', code, count=1)  # the history: tiny's raw ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(code, "README.md", "exec"), {})
    assert len(capsys.readouterr().out.strip().splitlines()) >= 1
