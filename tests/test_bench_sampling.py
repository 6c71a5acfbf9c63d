"""The sampled-softmax benchmark (benchmarks/bench_sampling.py) still runs: its tiniest
configuration reports every mode for both layouts, and a memory child reports its peak.
Not a timing check."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sampling", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--items", "300", "--batch", "4", "--context", "8", "--rows", "4", "--negatives", "8,32",
        "--threads", "1", "--steps", "1", "--warmup", "0", "--quick"]


def test_every_mode_runs_and_reports(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = bench.main(TINY + ["--layouts", "one,groups", "--no-memory", "--json", str(out)])
    rows = result["rows"]
    expected = {(layout, mode, n) for layout in ("one", "groups") for mode, n in bench.configurations(
        bench.parse_args(TINY))}
    assert {(r["layout"], r["mode"], r["n"]) for r in rows} == expected
    assert {r["mode"] for r in rows} == set(bench.MODES)
    for r in rows:
        assert r["step_ms"] > 0 and r["positions_per_s"] > 0
    assert all(r["ratio"] == 1.0 for r in rows if r["mode"] == "full")
    assert json.loads(out.read_text())["rows"] == rows
    table = capsys.readouterr().out
    assert all(f"| {mode} |" in table for mode in bench.MODES)


def test_memory_child_reports_its_peak():
    # a fresh process, as the benchmark runs it: VmHWM is per process, and inside pytest's the
    # high-water mark was set by earlier tests (and newer kernels read it approximately)
    root = BENCH.parents[1]
    out = subprocess.run([sys.executable, str(BENCH), *TINY, "--child", "groups:position-logq:32"],
                         capture_output=True, text=True, cwd=root, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["peak"] >= m["before"] > 0
