"""Shared fixtures: a temporary workspace and a CLI runner that goes through `mhr.cli.main`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


def run_cli(
    *args: str,
    workspace: Path | None = None,
    check: bool = True,
    env: dict | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run the real `mhr` CLI in a subprocess (as a user would), returning stdout/stderr/rc."""
    full_env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "mhr"]
    if workspace is not None:
        cmd += ["--workspace", str(workspace)]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mhr {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
        )
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP waits dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
