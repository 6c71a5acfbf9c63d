"""Reliability of training, runs and artifacts: each failure reproduced, then shown handled.

Negatives beyond the catalogue and their logits in the memory check; --max-steps 0; one-line errors
for bad numbers, devices and damaged weights; weights checked against their manifest; temp files of
killed processes reported and collected; one trainer per run; --deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mhr.training.train as mt
from mhr.cache import find_leftovers, lock_path, locked, remove_leftovers
from mhr.errors import BusyError, InputError, TrainingError, UsageError
from mhr.status import collect_status
from mhr.training.params import TrainParams
from mhr.training.runs import check_device, load_run, run_lock_path
from mhr.training.train import train
from mhr.windows import build_windows
from mhr.workspace import Workspace
from tests.helpers import interrupt_at_batch, make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=3, patience=0, lr=3e-3, warmup_steps=2)
PARAMS = TrainParams(priors=("item",), max_steps=3, **TINY)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny finished run, trained once; tests that damage it work on a copy (`fresh`)."""
    ds = make_dataset(tmp_path_factory.mktemp("trained") / "ws")
    build_windows(ds, context=12, horizon=4)
    train(ds, PARAMS, name="r", show_progress=False)
    return ds


@pytest.fixture
def fresh(trained, tmp_path):
    shutil.copytree(trained.root, tmp_path / "ws")
    return Workspace(tmp_path / "ws").dataset(trained.name)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _flip_bytes(path: Path, at: int = -64, n: int = 16) -> None:
    """Overwrite bytes inside the file, keeping its size (silent corruption: the size check alone misses it)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) + at, len(data) + at + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


# --- negatives beyond the catalogue; their logits in the memory check -----------------------------


def test_negatives_beyond_the_catalogue_are_refused(fresh):
    # 30 items in the tiny catalogue: 31 negatives could only repeat items
    with pytest.raises(UsageError, match="more than the catalogue's 30 items"):
        train(fresh, TrainParams(priors=("item",), negatives=31, max_steps=1, **TINY), name="n", show_progress=False)
    assert not (fresh.runs_dir / "n").exists()


def test_memory_check_counts_the_negatives_logits(monkeypatch):
    from mhr.models.multihead import backbone_config

    monkeypatch.setattr(mt, "_available_memory", lambda: 4 << 30)
    config = backbone_config("hstu", "1", 1682, 50)
    p = TrainParams(size="1", batch_size=64, negatives=1682)
    mt._check_memory(TrainParams(size="1", batch_size=64), config, 50, "cpu", 4)  # the backbone alone fits
    # 64 x 50 positions x 4 targets x 1682 negatives x 4 bytes x 3 copies = 0.24 GiB: fits in 4 GiB
    mt._check_memory(p, config, 50, "cpu", 4)
    with pytest.raises(TrainingError, match="100000 negatives .* of logits"):
        mt._check_memory(TrainParams(size="1", batch_size=64, negatives=100_000), config, 50, "cpu", 4)
    # chunked modes keep only their draws: 64 sequences x 100000 ids fit, one draw per position not
    mt._check_memory(TrainParams(size="1", batch_size=64, negatives=100_000, negatives_per="sequence"),
                     config, 50, "cpu", 4)
    with pytest.raises(TrainingError, match="100000 negatives"):
        mt._check_memory(TrainParams(size="1", batch_size=64, negatives=100_000, negatives_per="position"),
                         config, 50, "cpu", 4)


# --- --max-steps 0 --------------------------------------------------------------------------------


def test_max_steps_zero_is_a_usage_error():
    with pytest.raises(UsageError, match="--max-steps 0 must be at least 1"):
        TrainParams(max_steps=0).check()


# --- one-line errors for bad numbers, devices and damaged weights ---------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(lr=float("nan")), "--lr nan is not a finite"),
    (dict(lr=float("inf")), "--lr inf is not a finite"),
    (dict(lr=0.0), "must be positive"),
    (dict(lr=-1e-3), "must be positive"),
    (dict(temperature=float("nan")), "--temperature nan"),
    (dict(global_ratio=float("nan")), "--global-ratio"),  # the flag (--global-negatives-ratio: its alias)
    (dict(gamma=float("inf")), "--gamma inf is not a finite"),
    (dict(seed=-1), "--seed -1"),
    (dict(priors=("item", "item")), "--priors names item more than once"),
    (dict(clip=-1.0), "--clip and --weight-decay must be >= 0"),
    (dict(negatives=64, negatives_per="everywhere"), "unknown --negatives-per"),
    (dict(in_batch_negatives=True), "shapes a sampled softmax"),
    (dict(router=True), "--router needs heads"),
    (dict(router=True, priors=("item",), router_weight=-1.0), "--router-weight"),
])
def test_bad_numbers_are_usage_errors(bad, match):
    with pytest.raises(UsageError, match=match):
        TrainParams(**{**TINY, **bad}).check()


def test_unusable_device_is_a_usage_error(fresh, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="sees no CUDA GPU"):
        train(fresh, PARAMS, name="d", device="cuda", show_progress=False)
    with pytest.raises(UsageError, match="sees no CUDA GPU"):
        load_run(fresh, "r", device="cuda")
    with pytest.raises(UsageError, match="unknown --device"):
        check_device("gpu0")


def test_cli_bad_values_are_one_line_errors(fresh, cli):
    """Bad values through the real CLI: exit 2, a message, no traceback."""
    base = ("--dataset", "tiny", "train", "--size", "tiny", "--batch-size", "16", "--name", "x")
    for extra, match in ((("--lr", "nan"), "--lr nan"), (("--max-steps", "0"), "--max-steps 0")):
        out = cli(*base, *extra, workspace=fresh.root, check=False)
        assert out.returncode == 2, out.stderr
        assert match in out.stderr and "Traceback" not in out.stderr
    if not torch.cuda.is_available():
        out = cli(*base, "--max-steps", "1", "--device", "cuda", workspace=fresh.root, check=False)
        assert out.returncode == 2 and "CUDA" in out.stderr and "Traceback" not in out.stderr


def test_truncated_weights_are_a_one_line_error(fresh, cli):
    weights = fresh.runs_dir / "r" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="model.safetensors is damaged") as e:
        load_run(fresh, "r")
    assert "--force" in e.value.hint
    out = cli("--dataset", "tiny", "eval", "r", "--force", workspace=fresh.root, check=False)
    assert out.returncode == 2, out.stderr
    assert "model.safetensors is damaged" in out.stderr and "Traceback" not in out.stderr


def test_damaged_checkpoint_on_resume_is_a_one_line_error(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ws")
    build_windows(ds, context=12, horizon=4)
    p = TrainParams(priors=("item",), max_steps=6, **TINY)
    interrupt_at_batch(monkeypatch, 5, lambda: train(ds, p, name="r", show_progress=False))
    ckpt = ds.runs_dir / "r" / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert set(state["sha256"]) == {"model.safetensors", "optimizer.safetensors"}  # recorded when written
    _flip_bytes(ckpt / "model.safetensors")
    with pytest.raises(InputError, match="checkpoint/model.safetensors is damaged"):
        train(ds, p, name="r", resume=True, show_progress=False)
    (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 10)  # truncated; its hash no longer recorded
    del state["sha256"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(InputError, match="is damaged or truncated"):
        train(ds, p, name="r", resume=True, show_progress=False)


# --- weights checked against their manifest -------------------------------------------------------


def test_overwritten_weights_fail_their_manifest_hash(fresh, cli):
    weights = fresh.runs_dir / "r" / "model.safetensors"
    size = weights.stat().st_size
    _flip_bytes(weights)
    assert weights.stat().st_size == size and load_file(weights)  # still parses: only the hash tells
    with pytest.raises(InputError, match="sha256 differs"):
        load_run(fresh, "r")
    out = cli("--dataset", "tiny", "recommend", "r", "--user", "u0", workspace=fresh.root, check=False)
    assert out.returncode == 2 and "sha256 differs" in out.stderr and not out.stdout, out.stderr


def test_run_without_recorded_hashes_still_loads(fresh):
    manifest_path = fresh.runs_dir / "r" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for f in ("model.safetensors", "config.json"):
        del manifest["files"][f]
    manifest_path.write_text(json.dumps(manifest))
    assert load_run(fresh, "r").model is not None


def test_status_shows_damaged_runs_and_windows(fresh):
    states = {a["name"]: a["state"] for a in collect_status(fresh_ws(fresh))[0]["artifacts"]}
    assert set(states.values()) == {"done"}
    _flip_bytes(fresh.runs_dir / "r" / "model.safetensors")
    windows = next(p for p in fresh.windows_dir.iterdir() if not p.name.startswith("."))
    _flip_bytes(windows / "train.parquet", at=-200)
    states = {a["kind"]: a["state"] for a in collect_status(fresh_ws(fresh))[0]["artifacts"]}
    assert states == {"run": "damaged", "windows": "damaged"}


def fresh_ws(ds) -> Workspace:
    return Workspace(ds.root)


# --- temp files of killed processes: reported by status, removed by gc ----------------------------


def test_killed_store_build_leaves_temp_files_that_status_reports_and_gc_removes(tmp_path, cli):
    ws = tmp_path / "ws"
    # a first import killed with -9 while writing its store
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom mhr.store import new_store\n"
            "with new_store(Path(sys.argv[1])) as con:\n"
            "    con.execute('CREATE TABLE big AS SELECT range AS x FROM range(100000)')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws / "killed" / "store.duckdb")])
    assert proc.wait() == -signal.SIGKILL
    leftovers = find_leftovers(ws)
    assert leftovers and all(x.pid == proc.pid for x in leftovers)
    assert any(x.path.name == f".store.duckdb.tmp-{proc.pid}" for x in leftovers)

    # a dead windows build (its temp dir and spill folder) next to a finished dataset, and a live one
    ds = make_dataset(ws, with_priors=False)
    dead, live = _dead_pid(), os.getpid()
    for name in (f".abc.tmp-{dead}", f".spill-.abc.tmp-{dead}", f".abc.tmp-{live}"):
        (ds.windows_dir / name).mkdir(parents=True)
        (ds.windows_dir / name / "train.parquet").write_bytes(b"x" * 1000)
    (ds.runs_dir / "r").mkdir(parents=True)
    (ds.runs_dir / "r" / f"model.safetensors.tmp-{dead}").write_bytes(b"y" * 10)

    records = json.loads(cli("status", "--json", workspace=ws).stdout)
    by = {r["dataset"] or r["folder"]: r["leftovers"] for r in records}
    assert {Path(x["path"]).name for x in by["tiny"]} == {f".abc.tmp-{dead}", f".spill-.abc.tmp-{dead}",
                                                          f"model.safetensors.tmp-{dead}"}
    assert {x["size"] for x in by["tiny"]} == {1000, 10}
    assert by["killed"] and all(x["pid"] == proc.pid for x in by["killed"])
    assert "leftover temporary files" in cli("status", workspace=ws).stderr

    listed = cli("gc", "--dry-run", workspace=ws).stdout.split()
    assert len(listed) == len(leftovers) + 3 and all(Path(p).exists() for p in listed)
    removed = cli("gc", workspace=ws).stdout.split()
    assert sorted(removed) == sorted(listed) and not any(Path(p).exists() for p in removed)
    assert (ds.windows_dir / f".abc.tmp-{live}").is_dir()  # a live process's files are never touched
    assert find_leftovers(ws) == [] and ds.store_path.is_file()


def test_gc_rechecks_the_pid_before_removing(tmp_path, monkeypatch):
    import mhr.cache as mc

    (tmp_path / f".x.tmp-{_dead_pid()}").write_text("x")
    alive = iter([False, True])  # dead when found, alive again (pid reused) just before removal
    monkeypatch.setattr(mc, "pid_alive", lambda pid: next(alive))
    assert remove_leftovers(tmp_path) == [] and len(list(tmp_path.iterdir())) == 1


# --- one trainer per run --------------------------------------------------------------------------


def test_second_trainer_of_a_run_is_busy(fresh):
    with locked(run_lock_path(fresh, "b"), "mhr train (pid 4242)", "run b"):
        with pytest.raises(BusyError, match=r"pid 4242.* is writing run b"):
            train(fresh, PARAMS, name="b", show_progress=False)
        with pytest.raises(BusyError, match="pid 4242"):
            train(fresh, PARAMS, name="b", resume=True, show_progress=False)
        (fresh.runs_dir / "b").mkdir()
        states = {a["name"]: a["state"] for a in collect_status(fresh_ws(fresh))[0]["artifacts"]}
        assert states["b"] == "training: mhr train (pid 4242)"
        shutil.rmtree(fresh.runs_dir / "b")
    assert not train(fresh, PARAMS, name="b", show_progress=False).cached  # free again


def test_cli_second_trainer_exits_4(fresh, cli):
    code = ("import sys, time\nfrom pathlib import Path\nfrom mhr.cache import locked\n"
            "with locked(Path(sys.argv[1]), 'mhr train (pid 777)', 'run r2'):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_path(fresh.runs_dir / "r2"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = cli("--dataset", "tiny", "train", "--size", "tiny", "--priors", "item", "--max-steps", "1",
                  "--batch-size", "16", "--name", "r2", workspace=fresh.root, check=False)
        assert out.returncode == 4 and "pid 777" in out.stderr and "Traceback" not in out.stderr
    finally:
        holder.kill()
        holder.wait()


# --- --deterministic: bit-identical CPU runs ------------------------------------------------------


def test_deterministic_runs_give_identical_weights_and_restore_threads(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    p = TrainParams(priors=("item", "temporal"), negatives=5, max_steps=5, **TINY)
    weights = []
    for i in range(3):
        ds = make_dataset(tmp_path / f"ws{i}")
        build_windows(ds, context=12, horizon=4)
        if i == 2:  # killed after the step-3 checkpoint, resumed without the flag: it is kept
            interrupt_at_batch(monkeypatch, 5, lambda ds=ds: train(ds, p, name="r", show_progress=False,
                                                                   deterministic=True))
            r = train(ds, p, name="r", resume=True, show_progress=False)
        else:
            r = train(ds, p, name="r", show_progress=False, deterministic=True)
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
        config = json.loads((r.path / "config.json").read_text())
        assert config["deterministic"] is True and config["threads"] == 1
        weights.append(load_file(r.path / "checkpoint" / "model.safetensors"))
        # not part of the key: the same run without the flag is the cached one
        assert train(ds, p, name="r", show_progress=False).cached
    torch.set_num_threads(1)
    a = weights[0]
    assert all(torch.equal(a[k], b[k]) for b in weights[1:] for k in a)


def test_deterministic_mode_fixes_the_thread_dependent_gather_backward():
    """Why --deterministic is needed: with several threads the backward of `table[ids]` (an accumulating
    index_put) adds duplicates in a varying order (10 of 10 repeats differed in a probe at 2
    threads). Inside the mode: one thread, deterministic algorithms, identical gradients; after it,
    the caller's settings are back."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 16, requires_grad=True)
    ids, up = torch.randint(0, 50, (50_000,), generator=g), torch.randn(50_000, 16, generator=g)

    def grad() -> torch.Tensor:
        table.grad = None
        (table[ids] * up).sum().backward()
        return table.grad.clone()

    with mt._deterministic(True, "cpu"):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        ref = grad()
        assert all(torch.equal(ref, grad()) for _ in range(3))
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)


@pytest.mark.parametrize("old_name", [".checkpoint.old-{pid}", "checkpoint.old-{pid}"],
                         ids=["atomic_dir", "before-atomic_dir"])
def test_checkpoint_caught_between_its_renames_is_kept_by_gc_and_resumed(tmp_path, monkeypatch, old_name):
    p = TrainParams(priors=("item",), max_steps=6, **TINY)
    ref_ds = make_dataset(tmp_path / "ref")
    build_windows(ref_ds, context=12, horizon=4)
    ref = train(ref_ds, p, name="r", show_progress=False)
    ds = make_dataset(tmp_path / "ws")
    build_windows(ds, context=12, horizon=4)
    interrupt_at_batch(monkeypatch, 5, lambda: train(ds, p, name="r", show_progress=False))
    ckpt = ds.runs_dir / "r" / "checkpoint"
    old = ckpt.with_name(old_name.format(pid=_dead_pid()))
    os.replace(ckpt, old)  # killed after moving the previous checkpoint aside, before the new one landed
    assert find_leftovers(ds.root) == []  # the only copy: not garbage
    resumed = train(ds, p, name="r", resume=True, show_progress=False)
    assert not old.exists()
    a, b = load_file(ref.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
