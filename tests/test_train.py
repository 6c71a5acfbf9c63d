"""Training end to end on a tiny planted dataset: artifacts, cache, resume, determinism, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mhr.errors import NotFoundError, TrainingError, UsageError
from mhr.training.params import TrainParams
from mhr.training.runs import load_run
from mhr.training.train import train
from mhr.windows import build_windows
from tests.helpers import interrupt_at_batch, make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=3, patience=0, lr=3e-3, warmup_steps=2)


@pytest.fixture
def tiny(tmp_path):
    ds = make_dataset(tmp_path / "ws")
    build_windows(ds, context=12, horizon=4)
    return ds


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_train_writes_run_and_is_cached(tiny):
    p = TrainParams(priors=("temporal", "item"), compose="hierarchical", max_steps=6, **TINY)
    r = train(tiny, p, name="hier", show_progress=False)
    assert not r.cached and (r.path / "manifest.json").is_file() and (r.path / "config.json").is_file()
    log = [json.loads(x) for x in (r.path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7))
    assert all("valid_ndcg@10" in e for e in log if e["step"] % 3 == 0)
    assert 0.0 <= r.best["valid_ndcg@10"] <= 1.0
    again = train(tiny, p, name="hier", show_progress=False)
    assert again.cached and again.key == r.key
    loaded = load_run(tiny, "hier")
    assert loaded.layout.n_heads == 2 * 3
    with pytest.raises(UsageError, match="exists with other parameters"):
        train(tiny, TrainParams(priors=("item",), max_steps=6, **TINY), name="hier", show_progress=False)


def test_same_seed_same_weights_and_other_seed_differs(tmp_path):
    results = []
    for i, seed in enumerate((0, 0, 1)):
        ds = make_dataset(tmp_path / f"ws{i}")
        build_windows(ds, context=12, horizon=4)
        r = train(ds, TrainParams(priors=("item",), max_steps=4, seed=seed, **TINY), name="r", show_progress=False)
        results.append(_weights(r.path))
    a, b, c = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("extra", [
    {},  # the original sampler: one shared draw of 5 per batch
    {"negatives_per": "position", "in_batch_negatives": True, "logq": True, "router": True},
], ids=["batch", "position-inbatch-logq-router"])
def test_resume_is_bit_identical(tmp_path, monkeypatch, extra):
    p = TrainParams(priors=("item", "temporal"), compose="multiplicative", max_steps=8, negatives=5, **TINY,
                    **extra)
    ref_ds = make_dataset(tmp_path / "ref")
    build_windows(ref_ds, context=12, horizon=4)
    ref = train(ref_ds, p, name="r", show_progress=False)

    ds = make_dataset(tmp_path / "crash")
    build_windows(ds, context=12, horizon=4)
    # killed during step 5, after the step-3 checkpoint
    interrupt_at_batch(monkeypatch, 5, lambda: train(ds, p, name="r", show_progress=False))
    assert not (ds.runs_dir / "r" / "manifest.json").exists()
    with pytest.raises(UsageError, match="incomplete"):
        train(ds, p, name="r", show_progress=False)
    resumed = train(ds, p, name="r", resume=True, show_progress=False)
    a, b = _weights(ref.path), _weights(resumed.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = load_file(ref.path / "checkpoint" / "model.safetensors")
    cb = load_file(resumed.path / "checkpoint" / "model.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    la = [json.loads(x)["loss"] for x in (ref.path / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (resumed.path / "log.jsonl").read_text().splitlines()]
    assert la == lb


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tiny, monkeypatch):
    import mhr.training.step as mt

    real, calls = mt.multihead_loss, {"n": 0}

    def nan_after_four(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 4 else loss), stats

    monkeypatch.setattr(mt, "multihead_loss", nan_after_four)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        train(tiny, TrainParams(priors=("item",), max_steps=8, **TINY), name="n", show_progress=False)
    state = json.loads((tiny.runs_dir / "n" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3


def test_missing_prior_and_bad_options(tiny):
    with pytest.raises(NotFoundError, match="prior 'graph' is not built"):
        train(tiny, TrainParams(priors=("graph",), max_steps=2, **TINY), show_progress=False)
    with pytest.raises(UsageError, match="unknown composition"):
        train(tiny, TrainParams(priors=("item",), compose="weird", **TINY), show_progress=False)
    with pytest.raises(TrainingError, match="needs about"):
        train(tiny, TrainParams(priors=("item",), **{**TINY, "size": "1b", "batch_size": 4096}),
              show_progress=False)


def test_temporal_prior_must_match_horizon(tmp_path):
    ds = make_dataset(tmp_path / "ws", horizon=8)
    build_windows(ds, context=12, horizon=4)
    with pytest.raises(UsageError, match="horizon of 8"):
        train(ds, TrainParams(priors=("temporal",), max_steps=2, **TINY), show_progress=False)


def test_cli_train_prints_reference(tiny, cli):
    out = cli("--dataset", "tiny", "train", "--size", "tiny", "--priors", "item", "--max-steps", "3",
              "--batch-size", "16", "--name", "c", workspace=tiny.root)
    assert out.stdout.strip() == "run:c"
    again = cli("--dataset", "tiny", "train", "--size", "tiny", "--priors", "item", "--max-steps", "3",
                "--batch-size", "16", "--name", "c", workspace=tiny.root)
    assert again.stdout.strip() == "run:c" and "cached" in again.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tiny, tmp_path):
    """gloo, 2 processes × 8 rows vs 1 process × 16 rows: the same loss curve within tolerance."""
    common = ["--dataset", "tiny", "train", "--size", "tiny", "--priors", "item", "--max-steps", "5",
              "--batch-size", "16", "--dropout", "0", "--eval-every", "5", "--lr", "0.003"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mhr", "--workspace", str(tiny.root), *common, "--name", "one"],
                   check=True, env=env, capture_output=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "mhr", "--workspace", str(tiny.root), *common, "--name", "two"],
        env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x)["loss"] for x in (tiny.runs_dir / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (tiny.runs_dir / "two" / "log.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 5
    assert one[0] == pytest.approx(two[0], rel=0.05)
    assert max(abs(a - b) / a for a, b in zip(one, two, strict=True)) < 0.1


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_reads_only_its_shard_and_batches_stay_global(tiny, tmp_path, monkeypatch, world):
    """Under torchrun a rank materialises only its contiguous slice of the training windows (reading
    only the row groups holding it); the slices' contributions add up to the single-process batch."""
    import dataclasses as dc

    import numpy as np
    import pyarrow.parquet as pq

    import mhr.training.train as mt
    from mhr.training.step import batch_rows, make_batch
    from mhr.windows import load_windows

    wref = load_windows(tiny)
    full = wref.read_split("train")
    n = wref.count("train")
    assert n == len(full["user"]) and n > 20
    # the same windows in row groups of 7, to see which groups a rank reads
    split = tmp_path / "split"
    split.mkdir()
    pq.write_table(wref.table("train"), split / "train.parquet", row_group_size=7)
    small = dc.replace(wref, path=split)
    groups_read: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: groups_read.append(i) or real(self, i, *a, **k))

    shards, contributions = [], []
    rows = batch_rows(seed=0, step=1, batch_size=16, n_windows=n)
    for rank in range(world):
        lo, hi = mt.shard_bounds(n, rank, world)
        groups_read.clear()
        shard = small.read_split("train", rows=(lo, hi))
        assert len(shard["user"]) == hi - lo <= -(-n // world)  # the loaded window array: this rank's slice
        assert sorted(set(groups_read)) == list(range(lo // 7, (hi - 1) // 7 + 1))
        assert all(np.array_equal(shard[k], full[k][lo:hi]) for k in ("items", "ts", "events", "user", "length"))
        shards.append((lo, hi))
        contributions.append(mt.held_rows(shard, lo, rows))
    assert shards[0][0] == 0 and shards[-1][1] == n and all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))
    gathered = mt.unpack_rows(sum(contributions))
    one = make_batch(full, rows, 12, 4, "cpu")
    for rank in range(world):
        mine = np.arange(len(rows))[rank::world]
        ddp = make_batch(gathered, mine, 12, 4, "cpu")
        assert all(torch.equal(ddp[k], one[k][rank::world]) for k in one)
