"""The pipeline benchmark (benchmarks/bench_pipeline.py) still runs end to end: its `--tiny`
configuration drives every stage through the real CLI and reports each one. Not a timing check."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pipeline.py"
STAGES = ["synth", "export", "import", "graph", "windows", "train", "eval", "recommend"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pipeline"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage(bench, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "r.json"
    assert bench.main(["--tiny", "--dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "tiny" and [s["name"] for s in result["stages"]] == STAGES
    for s in result["stages"]:
        assert s["ok"] and s["seconds"] > 0 and 0 < s["peak_rss_gib"] < bench.RSS_GOAL_GIB, s
        assert s["throughput"] is None or s["throughput"] > 0, s
    size = bench.SIZES["tiny"]
    assert next(s for s in result["stages"] if s["name"] == "train")["throughput"] > 0
    assert (tmp_path / "work" / "recs.parquet").is_file()
    assert (tmp_path / "work" / "pipe.csv").read_text().count("\n") == size.csv_rows + 1
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in STAGES)
