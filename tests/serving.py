"""A tiny trained run behind a real `mhr serve` process, shared by the HTTP and browser tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mhr.training.params import TrainParams
from mhr.training.train import train
from mhr.windows import build_windows
from mhr.workspace import Dataset
from tests.helpers import make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=4, patience=0, lr=3e-3,
            warmup_steps=2, max_steps=8)


def tiny_run(root: Path, name: str = "heads") -> Dataset:
    """The planted 40-user dataset of `tests.helpers` and a run with heads over its item prior."""
    ds = make_dataset(root, n_users=40)
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(priors=("item",), **TINY), name=name, show_progress=False)
    return ds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ds: Dataset, run: str, *extra: str, timeout: float = 90) -> tuple[subprocess.Popen, str]:
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
    """Stop the server as Ctrl-C would; its stderr."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def call(url: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST when `body` is given."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text
        return e.code, json.loads(text)
