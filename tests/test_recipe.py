"""`mhr run`: every step through the library, logged as the command a user would type, and
recipes that share a dataset wait for each other instead of failing."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mhr.data.ingest import existing_state
from mhr.errors import BusyError
from mhr.recipe import run_recipe
from mhr.store import connect, data_key
from mhr.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]

RECIPE = """
[recipe]
name = "r"
dataset = "syn"
seeds = [0]
[data]
command = "synth"
options = {{ users = 60, items = 40, interactions = 3000, communities = 3, categories = 4, seed = 1 }}
[[priors]]
kind = "item"
name = "cat"
untagged = "other"
[[priors]]
kind = "temporal"
horizon = 4
segments = 2
[windows]
context = 12
horizon = 4
[train]
size = "tiny"
max_steps = {steps}
batch_size = 16
[variants.item]
priors = ["cat", "temporal"]
negatives = 8
[eval]
k = [10]
"""


NEW_PRIOR = """
[[priors]]
kind = "item"
name = "cat-all"
"""


def _recipe(tmp_path: Path, steps: int = 2) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(steps=steps))
    return path


def _commands(stderr: str) -> list[str]:
    return [line.split("$ mhr ", 1)[1].strip() for line in stderr.splitlines() if "$ mhr " in line]


def test_recipe_steps_log_the_commands_that_make_the_same_artifacts(tmp_path, capsys, cli):
    """Each step prints `$ mhr …`; typed into the CLI, those commands give the same data, prior,
    windows and run keys as the recipe's library calls."""
    ws = tmp_path / "ws"
    result = run_recipe(_recipe(tmp_path), Workspace(ws))
    commands = _commands(capsys.readouterr().err)
    assert [c.split()[0] for c in commands] == ["data", "priors", "priors", "windows", "train", "eval", "report"]
    assert commands[0].startswith("data synth --name syn --users 60 --items 40")
    assert commands[1] == "priors build --kind item --name cat --untagged other"
    assert commands[3] == "windows build --context 12 --horizon 4"
    assert commands[4].startswith("train --size tiny --priors cat,temporal --negatives 8 --max-steps 2 "
                                  "--batch-size 16 --windows windows:")
    assert commands[4].endswith("--name r-item-s0")
    assert commands[5] == "eval r-item-s0 --k 10"

    other = tmp_path / "by-hand"
    for command in commands[:5]:
        cli("--dataset", "syn", *shlex.split(command), workspace=other)
    ds, by_hand = Workspace(ws).dataset("syn"), Workspace(other).dataset("syn")
    keys = []
    for d in (ds, by_hand):
        con = connect(d.store_path, read_only=True)
        keys.append((data_key(con), con.execute("SELECT prior, key FROM priors ORDER BY prior").fetchall()))
        con.close()
    assert keys[0] == keys[1]
    assert sorted(p.name for p in ds.windows_dir.iterdir()) == sorted(p.name for p in by_hand.windows_dir.iterdir())
    run = json.loads((ds.runs_dir / "r-item-s0" / "manifest.json").read_text())
    assert run["key"] == json.loads((by_hand.runs_dir / "r-item-s0" / "manifest.json").read_text())["key"]
    assert result.runs == ["r-item-s0"] and result.report.is_file()


def _hold(script: str, *args: str) -> subprocess.Popen:
    """A second process running `script` (which prints "held" once it holds its lock, then sleeps)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


HOLD_DATASET_LOCK = """
    import sys, time
    from pathlib import Path
    from mhr.workspace import Workspace, writing
    with writing(Workspace(Path(sys.argv[1])).dataset(sys.argv[2]), sys.argv[3]):
        print("held", flush=True)
        time.sleep(float(sys.argv[4]))
"""

HOLD_STORE = """
    import sys, time
    import duckdb
    con = duckdb.connect(sys.argv[1])  # a writer's connection: DuckDB locks the file
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_recipe_waits_for_a_concurrent_writer_and_skips_locks_on_cached_steps(tmp_path, capsys):
    ws = tmp_path / "ws"
    recipe = _recipe(tmp_path)
    run_recipe(recipe, Workspace(ws))  # everything cached from here on
    capsys.readouterr()

    # another recipe holds the dataset's write lock for long: cached data and prior steps need no
    # lock, so nothing waits
    holder = _hold(HOLD_DATASET_LOCK, str(ws), "syn", "priors build", "60")
    try:
        started = time.monotonic()
        run_recipe(recipe, Workspace(ws), wait=30)
        assert time.monotonic() - started < 30
        assert "waiting for" not in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()

    # a new prior needs the lock: its step waits (a visible line naming the holder), then runs
    recipe.write_text(recipe.read_text() + NEW_PRIOR)
    holder = _hold(HOLD_DATASET_LOCK, str(ws), "syn", "priors build", "3")
    try:
        run_recipe(recipe, Workspace(ws), wait=60)
        log = capsys.readouterr().err
        assert re.search(rf"waiting for priors build \(pid {holder.pid}\)", log)
        assert "built prior:cat-all" in log
        assert log.count("waiting for") == 1  # said once, not at every poll
    finally:
        holder.wait()
    assert holder.returncode == 0  # it let go on its own: the recipe waited instead of failing


def test_recipe_gives_up_after_its_wait(tmp_path):
    ws = tmp_path / "ws"
    recipe = _recipe(tmp_path)
    run_recipe(recipe, Workspace(ws))
    recipe.write_text(recipe.read_text() + NEW_PRIOR)
    holder = _hold(HOLD_DATASET_LOCK, str(ws), "syn", "priors build", "60")
    try:
        started = time.monotonic()
        with pytest.raises(BusyError, match=f"priors build \\(pid {holder.pid}\\) is writing syn"):
            run_recipe(recipe, Workspace(ws), wait=2)
        assert time.monotonic() - started < 20
    finally:
        holder.kill()
        holder.wait()


def test_a_store_another_process_writes_is_busy_not_damaged(tmp_path, capsys):
    """existing_state used to take a locked store for an unreadable one ("will be replaced")."""
    ws = tmp_path / "ws"
    recipe = _recipe(tmp_path)
    run_recipe(recipe, Workspace(ws))
    ds = Workspace(ws).dataset("syn")
    capsys.readouterr()
    holder = _hold(HOLD_STORE, str(ds.store_path), "3")
    try:
        with pytest.raises(BusyError) as e:
            existing_state(ds)
        assert e.value.pid == holder.pid
        assert "will be replaced" not in capsys.readouterr().err
        run_recipe(recipe, Workspace(ws), wait=60)  # waits for the store, then finds everything cached
        log = capsys.readouterr().err
        assert f"waiting for process {holder.pid}" in log and "will be replaced" not in log
    finally:
        holder.wait()
    assert existing_state(ds)[0] is not None


@pytest.mark.parametrize("command, function", [
    (("data", "synth"), "mhr.data.synth:synth_store"),
    (("data", "fetch"), "mhr.data.fetch:fetch"),
    (("data", "import"), "mhr.data.imports:import_data"),
    (("windows", "build"), "mhr.windows:build_windows"),
])
def test_a_recipe_step_and_its_command_share_defaults(command, function):
    """A recipe leaves out what it does not set, so the library function's defaults must be its
    command's, or the logged command would build something else."""
    import importlib
    import inspect

    import typer.main

    from mhr.cli import app

    module, name = function.split(":")
    library = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    group = typer.main.get_command(app).commands[command[0]]
    options = {p.name.rstrip("_"): p.default for p in group.commands[command[1]].params}
    shared = {k for k in set(library) & set(options) - {"dataset", "name"}
              if library[k].default is not inspect.Parameter.empty}
    assert shared
    for key in shared:
        assert options[key] == library[key].default, f"mhr {' '.join(command)} --{key}"


def test_an_import_step_with_flags_in_its_args_builds_what_its_command_builds(tmp_path, capsys, cli):
    """`args = [path, "--items", path]` (as stages/router_toys.toml has it): the paths are read
    relative to the recipe, the flags become the library's options, the data key is the CLI's."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    rows = ["user_id,item_id,timestamp"] + [f"u{u},i{rng.integers(30)},{1000 + 10 * t}"
                                            for u in range(20) for t in range(15)]
    (data / "events.csv").write_text("\n".join(rows) + "\n")
    (data / "items.csv").write_text("item_id,title,genre\n" + "".join(f"i{i},Item {i},g{i % 3}\n" for i in range(30)))
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text("""
[recipe]
dataset = "ev"
[data]
command = "import"
args = ["../data/events.csv", "--items", "../data/items.csv", "--tag-col", "genre"]
options = { format = "long", min_history = 5 }
[windows]
context = 5
[variants]
""")
    ws = tmp_path / "ws"
    run_recipe(recipe, Workspace(ws))
    [command] = _commands(capsys.readouterr().err)
    assert command == (f"data import {data / 'events.csv'} --items {data / 'items.csv'} --tag-col genre "
                       "--name ev --format long --min-history 5")
    cli(*shlex.split(command), workspace=tmp_path / "by-hand")
    keys = []
    for root in (ws, tmp_path / "by-hand"):
        con = connect(Workspace(root).dataset("ev").store_path, read_only=True)
        keys.append((data_key(con), con.execute("SELECT count(*) FROM items WHERE len(tags) > 0").fetchone()))
        con.close()
    assert keys[0] == keys[1] and keys[0][1] == (30,)
