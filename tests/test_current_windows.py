"""The windows (and run) a command uses are the ones the user last asked for, never the newest by
time; a recorded choice that is gone or stale is an error that lists the alternatives."""

from __future__ import annotations

import json
import shutil

import pytest

from mhr.errors import NotFoundError, StaleError, UsageError
from mhr.windows import build_windows, describe_windows, find_windows, load_windows
from mhr.workspace import current_run, read_current, record_current
from tests.helpers import make_dataset


def _ref(key: str) -> str:
    return f"windows:{key[:12]}"


def test_cached_build_becomes_current_and_train_uses_it(tmp_path, cli):
    """The README tour in a workspace that already holds other windows: build (T 12, τ 8), someone builds
    (T 6, τ 4) later, the user builds (T 12, τ 8) again (cached) and trains: training uses T 12, τ 8."""
    ds = make_dataset(tmp_path / "ws", horizon=8)
    first = cli("--dataset", "tiny", "windows", "build", "--context", "12", "--horizon", "8",
                workspace=ds.root).stdout.strip()
    later = cli("--dataset", "tiny", "windows", "build", "--context", "6", "--horizon", "4",
                workspace=ds.root).stdout.strip()
    assert later != first and cli("--dataset", "tiny", "windows", "show",
                                  workspace=ds.root).stdout.strip() == later
    again = cli("--dataset", "tiny", "windows", "build", "--context", "12", "--horizon", "8", workspace=ds.root)
    assert again.stdout.strip() == first and "cached" in again.stderr
    shown = cli("--dataset", "tiny", "windows", "show", workspace=ds.root)
    assert shown.stdout.strip() == first and "current" in shown.stderr
    assert json.loads(cli("--dataset", "tiny", "windows", "show", "--json",
                          workspace=ds.root).stdout)["params"]["context"] == 12

    out = cli("--dataset", "tiny", "train", "--size", "tiny", "--priors", "temporal,item", "--max-steps", "2",
              "--batch-size", "16", "--name", "tour", workspace=ds.root)
    assert out.stdout.strip() == "run:tour"
    config = json.loads((ds.runs_dir / "tour" / "config.json").read_text())
    assert _ref(config["windows"]["key"]) == first
    assert (config["windows"]["params"]["context"], config["windows"]["params"]["horizon"]) == (12, 8)

    status = json.loads(cli("--dataset", "tiny", "status", "--json", workspace=ds.root).stdout)
    assert _ref(status[0]["current"]["windows"]) == first and status[0]["current"]["run"] == "tour"
    assert current_run(ds) == "tour"


def test_explicit_windows_override_the_current(tmp_path):
    ds = make_dataset(tmp_path / "ws")
    k1, _, _ = build_windows(ds, context=8, horizon=2)
    k2, _, _ = build_windows(ds, context=6, horizon=2)
    assert load_windows(ds).key == k2 and load_windows(ds, _ref(k1)).key == k1
    assert read_current(ds)["windows"] == k2  # naming windows does not change the current ones
    assert describe_windows(ds, k1)["default"] is False and describe_windows(ds)["default"] is True


def test_missing_damaged_or_stale_current_windows_list_the_alternatives(tmp_path, cli):
    ds = make_dataset(tmp_path / "ws")
    k1, _, _ = build_windows(ds, context=8, horizon=2)
    k2, p2, _ = build_windows(ds, context=6, horizon=2)

    shutil.rmtree(p2)  # the recorded windows are gone: no silent fallback to k1
    with pytest.raises(NotFoundError, match=rf"current windows windows:{k2[:12]}.*missing.*{k1[:12]} \(T = 8"):
        load_windows(ds)
    bad = cli("--dataset", "tiny", "train", "--size", "tiny", "--max-steps", "1", workspace=ds.root, check=False)
    assert bad.returncode != 0 and k1[:12] in bad.stderr and "--windows" in bad.stderr
    assert not (ds.runs_dir / "hstu-tiny").exists()

    build_windows(ds, context=6, horizon=2)  # rebuilt: current again
    (p2 / "manifest.json").write_text("{")  # damaged: not trusted
    with pytest.raises(NotFoundError, match="missing or damaged"):
        find_windows(ds)

    k2, _, _ = build_windows(ds, context=6, horizon=2)
    make_dataset(tmp_path / "ws", seed=1)  # the data changed under the recorded windows
    with pytest.raises(StaleError, match=r"another version.*mhr windows build --context 6 --horizon 2"):
        load_windows(ds)
    k3, _, cached = build_windows(ds, context=8, horizon=2)
    assert not cached and load_windows(ds).key == k3


def test_legacy_workspace_without_a_record(tmp_path):
    ds = make_dataset(tmp_path / "ws")
    k1, _, _ = build_windows(ds, context=8, horizon=2)
    ds.current_path.unlink()
    assert load_windows(ds).key == k1  # one candidate: used
    k2, _, _ = build_windows(ds, context=6, horizon=2)
    ds.current_path.unlink()
    with pytest.raises(UsageError, match=rf"several windows.*{k1[:12]}.*{k2[:12]}|several windows.*{k2[:12]}.*{k1[:12]}"):
        load_windows(ds)
    make_dataset(tmp_path / "ws", seed=1)
    with pytest.raises(StaleError, match="another version"):
        load_windows(ds)


def test_current_run_follows_the_last_training(tmp_path):
    ds = make_dataset(tmp_path / "ws")
    with pytest.raises(NotFoundError, match="no finished run"):
        current_run(ds)
    for name in ("a", "b"):
        (ds.runs_dir / name).mkdir(parents=True)
        (ds.runs_dir / name / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="several runs.*a, b"):
        current_run(ds)
    record_current(ds, run="a")
    (ds.runs_dir / "b" / "manifest.json").touch()  # newer, but not the user's choice
    assert current_run(ds) == "a"
    shutil.rmtree(ds.runs_dir / "a")
    with pytest.raises(NotFoundError, match="current run 'a'.*finished: b"):
        current_run(ds)
    record_current(ds, windows="k")  # records are merged, not replaced
    assert read_current(ds) == {"run": "a", "windows": "k"}
