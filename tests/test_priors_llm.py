"""LLM tag consolidation: the real `openai` client over real HTTP against a scripted
OpenAI-compatible server on 127.0.0.1 (garbage answers, timeouts, a dead endpoint, the cache)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import mhr.priors.llm as llm
from mhr.errors import ExternalError
from mhr.priors.build import build_prior, make_params
from mhr.priors.spec import load_prior
from mhr.store import connect
from tests.test_priors_fixtures import make_store

KEY = "sk-test-secret-0123456789"
TRUTH = {"Horror": ["Dark"], "Comedy": ["Light"], "Romance": ["Light"], "Documentary": ["Dark", "Light"]}


class FakeLLM:
    """Answers /v1/chat/completions according to `script` ("good", "garbage", "unknown", "slow"),
    the last entry repeating; counts calls."""

    def __init__(self) -> None:
        self.script = ["good"]
        self.calls = 0
        self.auth: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.auth.append(self.headers.get("Authorization", ""))
                mode = fake.script[min(fake.calls, len(fake.script) - 1)]
                fake.calls += 1
                prompt = body["messages"][-1]["content"]
                tags = json.loads(re.search(r"Tags: (\[.*?\])\n", prompt).group(1))
                if mode == "slow":
                    time.sleep(1.5)
                if mode == "garbage":
                    content = "Sure! Horror is dark, the rest are light."
                elif mode == "unknown":
                    content = json.dumps({t: ["Spooky"] for t in tags})
                else:
                    content = "```json\n" + json.dumps({t: TRUTH[t] for t in tags}) + "\n```"
                reply = {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(monkeypatch):
    server = FakeLLM()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setattr(llm, "BACKOFF_S", 0.01)
    yield server
    server.close()


def build(ds, name="llm", **options):
    opts = {"llm": "openai", "categories": ("Dark", "Light"), "model": "fake-1", "retries": 3, "timeout": 5.0,
            **options}
    return build_prior(ds, "item", make_params("item", opts), name=name, force=True)


def test_garbage_then_good_answer_then_cached_rerun(tmp_path, fake):
    ds = make_store(tmp_path, untagged=0)
    fake.script = ["garbage", "good"]
    r = build(ds)
    assert fake.calls == 2 and r.report["llm_retries"] == 1
    assert fake.auth[-1] == f"Bearer {KEY}"
    con = connect(ds.store_path, read_only=True)
    spec = load_prior(con, "llm")
    tables = {t: con.execute(f"SELECT * FROM {t}").fetchall()
              for t in ("priors", "llm_cache", "stage_runs", "meta", "prior_groups")}
    con.close()
    assert spec.group_names == ("Dark", "Light")
    horror_item, doc_item = 3, 3 * 20 + 3  # item ids: community 0 = Horror, community 3 = Documentary
    assert spec.item_groups[:, horror_item].tolist() == [True, False]
    assert spec.item_groups[:, doc_item].tolist() == [True, True]
    assert KEY not in repr(tables)  # the key is never written
    assert len(tables["llm_cache"]) == 1
    fake.calls = 0
    r = build(ds)  # --force: rebuilt, but every answer comes from the cache
    assert fake.calls == 0 and r.report["llm_cached_answers"] == 1 and r.report["llm_calls"] == 0


def test_unknown_categories_are_retried_then_a_clear_error(tmp_path, fake):
    ds = make_store(tmp_path)
    fake.script = ["unknown"]
    with pytest.raises(ExternalError, match=r"failed after 3 attempt\(s\): invalid answer .*unknown categories"):
        build(ds)
    assert fake.calls == 3


def test_timeout_is_retried_then_reported(tmp_path, fake):
    ds = make_store(tmp_path)
    fake.script = ["slow"]
    t = time.time()
    with pytest.raises(ExternalError, match=r"no answer within 0.3 s"):
        build(ds, timeout=0.3, retries=2)
    assert fake.calls == 2 and time.time() - t < 10


def test_endpoint_down(tmp_path, fake, monkeypatch):
    ds = make_store(tmp_path)
    fake.close()
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    with pytest.raises(ExternalError, match="cannot reach the endpoint") as e:
        build(ds, retries=2)
    assert KEY not in str(e.value)


def test_failed_build_keeps_answers_already_paid_for(tmp_path, fake):
    ds = make_store(tmp_path, untagged=0)
    fake.script = ["good", "garbage"]  # first batch answered, the second never
    with pytest.raises(ExternalError):
        build(ds, batch_size=2)
    con = connect(ds.store_path, read_only=True)
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM priors").fetchone()[0] == 0  # nothing half-written
    con.close()
    fake.script, fake.calls = ["good"], 0
    r = build(ds, batch_size=2)
    assert fake.calls == 1 and r.report["llm_cached_answers"] == 1


def test_validate_mapping_rules():
    cats = ["Dark", "Light"]
    assert llm.validate_mapping('{"a": "dark", "b": ["Light", "DARK"]}', ["a", "b"], cats) == {
        "a": ["Dark"], "b": ["Light", "Dark"]}
    for bad, why in (("[1]", "not a JSON object"), ('{"a": ["Dark"]}', "missing"),
                     ('{"a": [], "b": ["Dark"]}', "non-empty"), ("nope", "not JSON")):
        with pytest.raises(llm._BadAnswer, match=why):
            llm.validate_mapping(bad, ["a", "b"], cats)
    assert llm.public_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
