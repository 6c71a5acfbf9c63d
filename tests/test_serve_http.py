"""`mhr serve` as a client meets it: a real server process on a free port, every endpoint and the
ways a request can be wrong, on a tiny run trained in the fixture."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="mhr serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="mhr serve needs the serve extra: pip install -e '.[serve]'")

from mhr.data.dense import normalise_id  # noqa: E402
from mhr.ranking.recommend import recommend  # noqa: E402
from mhr.store import connect  # noqa: E402
from mhr.training.train import TrainParams, load_run, train  # noqa: E402
from mhr.windows import build_windows  # noqa: E402
from tests.helpers import GENRES, make_dataset  # noqa: E402

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=4, patience=0, lr=3e-3,
            warmup_steps=2, max_steps=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ds, run: str, *extra: str, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """`mhr serve` in a subprocess; returns once /health answers (or fails with the server's stderr)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "mhr", "--workspace", str(ds.root), "--dataset", ds.name,
                             "serve", run, "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mhr serve exited {proc.returncode}:\n{proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"mhr serve did not answer within {timeout} s")


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def call(url: str, path: str, body: bytes | dict | None = None, content_type: str = "application/json"
         ) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url + path, data=data, headers={"content-type": content_type} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text
        return e.code, json.loads(text)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("serve") / "ws"
    ds = make_dataset(root, n_users=40)
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(priors=("item",), **TINY), name="heads", show_progress=False)
    proc, url = start_server(ds, "heads", "--wait-ms", "30")
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
    for g in GENRES:
        assert user["profile"]["item"][g] == pytest.approx(np.mean([g in tags[i] for i in items]))
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
])
def test_bad_requests_are_4xx_naming_the_field(served, method, path, body, status, field):
    _, url = served
    code, answer = call(url, path, body if method == "POST" else None)
    assert (code, answer["field"]) == (status, field), answer
    assert answer["error"] and "Traceback" not in json.dumps(answer)


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


def test_serve_refuses_a_busy_port_and_a_missing_run(served, cli):
    ds, url = served
    port = url.rsplit(":", 1)[1]
    res = cli("--dataset", ds.name, "serve", "heads", "--port", port, workspace=ds.root, check=False)
    assert res.returncode == 2 and f"127.0.0.1:{port}" in res.stderr and "--port" in res.stderr
    res = cli("--dataset", ds.name, "serve", "nope", "--port", str(free_port()), workspace=ds.root, check=False)
    assert res.returncode == 3 and "'nope'" in res.stderr


def test_readme_names_the_serve_extra():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "-e '.[serve]'" in readme and "mhr serve" in readme
