"""Start `mhr serve`: load the run once, check the address, run uvicorn until Ctrl-C."""

from __future__ import annotations

import errno
import importlib.util
import socket

from mhr.console import err
from mhr.errors import UsageError
from mhr.workspace import Dataset

STACK = ("fastapi", "uvicorn")


def check_stack() -> None:
    """The web stack is an extra (`pip install -e '.[serve]'`): say so instead of an ImportError."""
    missing = [m for m in STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"mhr serve needs {' and '.join(missing)}, which are not installed",
                         hint="pip install -e '.[serve]' (or pip install fastapi uvicorn)")


def check_address(host: str, port: int) -> None:
    """Refuse a port another process holds (or a host this machine has not) before loading the run."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port", hint="pick one in 1..65535, e.g. 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} cannot be resolved: {e.strerror}", hint="e.g. 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            busy = e.errno == errno.EADDRINUSE
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}",
                             hint="pick another --port" if busy else "use --host 127.0.0.1 (this machine)") from None


def serve(dataset: Dataset, run: str, host: str = "127.0.0.1", port: int = 8000, fusion: str = "max",
          max_batch: int = 64, wait_ms: float = 2.0) -> None:
    """Serve `run` of `dataset` over HTTP on host:port until interrupted."""
    check_stack()
    check_address(host, port)
    import uvicorn

    from mhr.ranking.service import Recommender
    from mhr.serve.app import create_app
    from mhr.serve.work import Service

    if max_batch < 1 or wait_ms < 0:
        raise UsageError("--max-batch must be at least 1 and --wait-ms at least 0")
    rec = Recommender.load(dataset.root, dataset.name, run, fusion=fusion)
    app = create_app(Service.create(rec, max_batch=max_batch, wait_s=wait_ms / 1000))
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving run {rec.run.name} of {dataset.name} on http://{shown}:{port}/ (API docs: /docs); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
