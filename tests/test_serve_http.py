"""`mhr serve` as a client meets it: a real server process on a free port, every endpoint and the
ways a request can be wrong, on a tiny run trained in the fixture."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="mhr serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="mhr serve needs the serve extra: pip install -e '.[serve]'")

from mhr.data.dense import normalise_id  # noqa: E402
from mhr.ranking.objectives import Boost, Objectives, Steer  # noqa: E402
from mhr.ranking.recommend import recommend  # noqa: E402
from mhr.ranking.service import Recommender  # noqa: E402
from mhr.store import connect  # noqa: E402
from mhr.training.runs import load_run  # noqa: E402
from tests.helpers import GENRES  # noqa: E402
from tests.serving import call, free_port, start_server, stop_server, tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    ds = tiny_run(tmp_path_factory.mktemp("serve") / "ws")
    proc, url = start_server(ds, "heads", "--wait-ms", "10")
    yield ds, url
    stop_server(proc)


def stored_history(ds, raw_user: str) -> tuple[list[str], list[int]]:
    con = connect(ds.store_path, read_only=True)
    rows = con.execute("SELECT i.raw_id, x.ts FROM interactions x JOIN items i USING (item_id) "
                       "JOIN users u USING (user_id) WHERE u.raw_id = ? ORDER BY x.pos", [raw_user]).fetchall()
    con.close()
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def test_health_and_pages(served):
    ds, url = served
    assert url.startswith("http://127.0.0.1:")  # localhost by default
    code, health = call(url, "/health")
    assert code == 200 and health["status"] == "ok" and health["run"] == "heads"
    assert health["items"] == 30 and health["users"] == 40 and health["heads"] == list(GENRES)
    assert health["priors"] == {"item": list(GENRES)}
    with urllib.request.urlopen(url + "/") as res:
        page = res.read().decode()
    assert "/static/app.js" in page and "<table id=\"recs\">" in page
    with urllib.request.urlopen(url + "/static/app.js") as res:
        assert b"/recommend" in res.read()
    code, spec = call(url, "/openapi.json")
    assert code == 200 and {"/recommend", "/users/{user}", "/items/{item}", "/health"} <= set(spec["paths"])
    with urllib.request.urlopen(url + "/docs") as res:
        assert b"swagger" in res.read().lower()


def test_recommend_for_a_user_is_mhr_recommend(served):
    ds, url = served
    want, _ = recommend(load_run(ds, "heads"), ds, "u3", top=5)
    code, got = call(url, "/recommend?user=u3&k=5")
    assert code == 200 and got["user"] == "u3" and got["k"] == 5
    assert [r["item"] for r in got["items"]] == [w.raw_id for w in want]
    assert [r["head"] for r in got["items"]] == [w.head for w in want]
    assert [r["score"] for r in got["items"]] == pytest.approx([w.score for w in want], abs=1e-5)
    assert [r["rank"] for r in got["items"]] == [1, 2, 3, 4, 5]
    first = got["items"][0]
    assert first["groups"]["item"] and set(first["groups"]["item"]) <= set(GENRES)
    # exposure: the share of the list in each group, from the items' groups
    for g in GENRES:
        share = np.mean([g in r["groups"]["item"] for r in got["items"]])
        assert got["exposure"]["item"][g] == pytest.approx(share)
    items, _ = stored_history(ds, "u3")
    assert got["history_length"] == len(items) and not {r["item"] for r in got["items"]} & set(items)
    code, kept = call(url, "/recommend?user=u3&k=5&keep_history=true&explain=false")
    assert code == 200 and all(r["head"] is None for r in kept["items"])


def test_posted_history_ranks_like_the_stored_user(served):
    ds, url = served
    items, ts = stored_history(ds, "u7")
    _, by_user = call(url, "/recommend?user=u7&k=6")
    padded = [f"  {i} " for i in items]  # raw ids are trimmed as imports trim them
    code, got = call(url, "/recommend", {"history": padded, "timestamps": ts, "user": "u7", "k": 6})
    assert code == 200 and got["history_known"] == len(items)
    assert [r["item"] for r in got["items"]] == [r["item"] for r in by_user["items"]]
    assert [r["score"] for r in got["items"]] == pytest.approx([r["score"] for r in by_user["items"]], abs=1e-5)
    code, skipped = call(url, "/recommend", {"history": ["nope", *items[-5:]], "k": 3, "unknown": "skip"})
    assert code == 200 and skipped["history_known"] == 5 and len(skipped["items"]) == 3
    assert normalise_id(" 50 ") == "50" and normalise_id(50.0) == "50" and normalise_id("i2.0") == "i2.0"


def test_user_and_item(served):
    ds, url = served
    items, ts = stored_history(ds, "u1")
    code, user = call(url, "/users/u1?limit=5")
    assert code == 200 and user["length"] == len(items)
    assert [h["item"] for h in user["history"]] == items[-5:] and [h["ts"] for h in user["history"]] == ts[-5:]
    assert all(h["title"].startswith("Item ") for h in user["history"])
    con = connect(ds.store_path, read_only=True)
    tags = dict(con.execute("SELECT raw_id, tags FROM items").fetchall())
    con.close()
    split = [1 / len(tags[i]) for i in items]  # Steck's p(g | i): an item's mass split over its groups
    for g in GENRES:
        mass = sum(w for i, w in zip(items, split, strict=True) if g in tags[i])
        assert user["history_mix"]["item"][g] == pytest.approx(mass / len(items))
    code, users = call(url, "/users?limit=3&offset=1")
    assert code == 200 and users == {"total": 40, "users": ["u1", "u2", "u3"]}
    code, item = call(url, "/items/i5")  # item 5 is Drama + Action (see tests.helpers)
    assert code == 200 and item["title"] == "Item 5 (Drama/Action)"
    assert set(item["groups"]["item"]) == {"Drama", "Action"} and set(item["heads"]) == {"Drama", "Action"}


@pytest.mark.parametrize("method,path,body,status,field", [
    ("GET", "/recommend?user=nobody", None, 404, "user"),
    ("GET", "/recommend", None, 422, "user"),
    ("GET", "/recommend?user=u1&k=0", None, 422, "k"),
    ("GET", "/recommend?user=u1&k=-3", None, 422, "k"),
    ("GET", "/recommend?user=u1&k=31", None, 422, "k"),
    ("GET", "/recommend?user=u1&k=ten", None, 422, "k"),
    ("GET", "/users/nobody", None, 404, "user"),
    ("GET", "/users/u1?limit=0", None, 422, "limit"),
    ("GET", "/items/nothing", None, 404, "item"),
    ("POST", "/recommend", b"{not json", 400, "body"),
    ("POST", "/recommend", b"[1, 2]", 422, "body"),
    ("POST", "/recommend", {"k": 3}, 422, "history"),
    ("POST", "/recommend", {"history": []}, 422, "history"),
    ("POST", "/recommend", {"history": ["i1", "nope"]}, 404, "history"),
    ("POST", "/recommend", {"history": ["i1", "i2"], "timestamps": [1]}, 422, "timestamps"),
    ("POST", "/recommend", {"history": ["i1"], "k": 1000}, 422, "k"),
    ("POST", "/recommend", {"history": ["i1"], "user": "nobody"}, 404, "user"),
    ("POST", "/recommend", {"history": ["i1"], "unknown": "ignore"}, 422, "unknown"),
    ("POST", "/recommend", {"history": [{"id": 1}]}, 422, "history.0"),
    ("POST", "/recommend", {"history": ["i1"] * 10_001}, 413, "history"),
    ("POST", "/recommend", {"history": ["i1"], "timestamps": [10**30]}, 422, "timestamps.0"),
    ("GET", "/recommend?user=u1&steer=item:Action", None, 422, "steer"),
    ("GET", "/recommend?user=u1&steer=item:Action=1.5", None, 422, "steer"),
    ("GET", "/recommend?user=u1&steer=item:Westerns=0.2", None, 422, "steer"),
    ("GET", "/recommend?user=u1&boost=item:Drama=lots", None, 422, "boost"),
    ("GET", "/recommend?user=u1&boost=nope:Drama=1", None, 422, "boost"),
    ("GET", "/recommend?user=u1&calibrate=item&calibrate_lambda=2", None, 422, "calibrate_lambda"),
    ("GET", "/recommend?user=u1&calibrate=temporal", None, 422, "calibrate"),
    ("POST", "/recommend", {"history": ["i1"], "steer": ["item:Drama=0.5"], "calibrate": "item"}, 422, "steer"),
])
def test_bad_requests_are_4xx_naming_the_field(served, method, path, body, status, field):
    _, url = served
    code, answer = call(url, path, body if method == "POST" else None)
    assert (code, answer["field"]) == (status, field), answer
    assert answer["error"] and "Traceback" not in json.dumps(answer)


def test_a_body_over_the_cap_is_refused_unread(served):
    _, url = served
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    conn.putrequest("POST", "/recommend")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(64 << 20))
    conn.endheaders()  # no body sent: the answer must not wait for it
    res = conn.getresponse()
    answer = json.loads(res.read())
    conn.close()
    assert res.status == 413 and answer["field"] == "body" and "64" not in answer["hint"]


def test_objectives_rank_as_the_recommender_does(served):
    ds, url = served
    rec = Recommender.load(ds.root, ds.name, "heads")
    items, ts = stored_history(ds, "u2")
    _, plain = call(url, "/recommend?user=u2&k=5")
    low = min(GENRES, key=lambda g: plain["exposure"]["item"][g])
    cases = [(f"boost=item:{low}=5", Objectives(boost=(Boost("item", low, 5.0),))),
             (f"steer=item:{low}=0.5", Objectives(steer=(Steer("item", low, 0.5),))),
             ("calibrate=item&calibrate_lambda=0.9", Objectives(calibrate="item", calibrate_lambda=0.9))]
    for query, objectives in cases:
        code, got = call(url, f"/recommend?user=u2&k=5&{query}")
        want = rec.recommend(items, 5, timestamps=ts, user="u2", objectives=objectives)
        assert code == 200 and [r["item"] for r in got["items"]] == [w.raw_id for w in want], query
        assert [r["score"] for r in got["items"]] == pytest.approx([w.score for w in want], abs=1e-5)
    _, boosted = call(url, f"/recommend?user=u2&k=5&boost=item:{low}=5")
    assert boosted["objectives"]["boost"] == [f"item:{low}=5"]
    assert boosted["exposure"]["item"][low] > plain["exposure"]["item"][low]
    _, steered = call(url, f"/recommend?user=u2&k=5&steer=item:{low}=0.5")
    assert steered["exposure"]["item"][low] >= 0.5
    code, posted = call(url, "/recommend", {"history": items, "timestamps": ts, "user": "u2", "k": 5,
                                            "steer": [f"item:{low}=0.5"]})
    assert code == 200 and [r["item"] for r in posted["items"]] == [r["item"] for r in steered["items"]]


def test_interest_profile(served):
    ds, url = served
    items, ts = stored_history(ds, "u5")
    rec = Recommender.load(ds.root, ds.name, "heads")
    want = rec.profile(items, timestamps=ts, user="u5")
    _, user = call(url, "/users/u5")
    _, listed = call(url, "/recommend?user=u5&k=3&profile=true")
    for got in (user["profile"], listed["profile"]):
        assert set(got) == {"item"} and sum(got["item"].values()) == pytest.approx(1.0)
        assert got["item"] == pytest.approx(want["item"], abs=1e-6)
    assert call(url, "/recommend?user=u5&k=3")[1]["profile"] is None


def test_concurrent_requests_share_scoring_calls(served):
    ds, url = served
    users = [f"u{u}" for u in range(16)]
    alone = {u: call(url, f"/recommend?user={u}&k=4")[1]["items"] for u in users[:4]}
    _, before = call(url, "/health")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda u: call(url, f"/recommend?user={u}&k=4"), users))
    _, after = call(url, "/health")
    assert all(code == 200 for code, _ in answers)
    calls = after["batches"]["calls"] - before["batches"]["calls"]
    requests = after["batches"]["requests"] - before["batches"]["requests"]
    assert requests == 16 and calls < 16  # batched
    for u, (_, got) in zip(users, answers, strict=False):
        if u in alone:  # a list ranked in a batch is the list ranked alone
            assert [r["item"] for r in got["items"]] == [r["item"] for r in alone[u]]
            assert [r["score"] for r in got["items"]] == pytest.approx([r["score"] for r in alone[u]], abs=1e-5)


def test_serve_refuses_a_busy_port_and_a_missing_run(served):
    ds, url = served
    port = url.rsplit(":", 1)[1]
    code, err = in_process(ds, "serve", "heads", "--port", port)
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err
    code, err = in_process(ds, "serve", "nope", "--port", str(free_port()))
    assert code == 3 and "'nope'" in err


def in_process(ds, *args: str) -> tuple[int, str]:
    """The real CLI (`mhr.cli.main`) in this process: (exit code, stderr)."""
    from mhr.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["--workspace", str(ds.root), "--dataset", ds.name, *args])
        except SystemExit as e:
            return int(e.code or 0), err.getvalue()
    return 0, err.getvalue()


def test_readme_names_the_serve_extra():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "-e '.[serve]'" in readme and "mhr serve" in readme


def test_cli_start_loads_no_web_stack():
    # the CLI (`mhr serve` registered) and serve's starter import FastAPI, uvicorn and torch only when serving
    code = ("import sys, mhr, mhr.cli, mhr.serve, mhr.serve.server; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unexpected_error_is_a_bare_500_and_the_batcher_goes_on(served, monkeypatch):
    pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
    from starlette.testclient import TestClient

    from mhr.serve.app import create_app
    from mhr.serve.work import Service

    ds, _ = served
    service = Service.create(Recommender.load(ds.root, ds.name, "heads"))
    real, calls = service.rec.rank_encoded, {"n": 0}

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("/secret/path in a message")
        return real(*args, **kwargs)

    monkeypatch.setattr(service.rec, "rank_encoded", fails_once)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        res = client.get("/recommend?user=u1&k=3")
        assert res.status_code == 500 and res.json()["error"] == "internal error (RuntimeError)"
        assert "secret" not in res.text and "Traceback" not in res.text
        res = client.get("/recommend?user=u1&k=3")
        assert res.status_code == 200 and len(res.json()["items"]) == 3
