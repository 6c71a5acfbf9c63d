"""Reliability, round three (issue 23): what must never happen to a user's files, and the last
tracebacks. Each class reproduced with a stand-in (a FIFO and a Unix socket under a temp dir for a
device, bytes flipped inside a store, a file-size limit for a full disk), then shown handled.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from mhr.training.params import TrainParams
from mhr.training.train import train
from mhr.windows import build_windows
from tests.conftest import run_cli
from tests.helpers import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_ws(tmp_path_factory) -> Path:
    """A workspace with one small synthetic dataset made by the CLI (so `--force` can rebuild it)."""
    ws = tmp_path_factory.mktemp("synth") / "ws"
    run_cli("data", "synth", "--users", "50", "--items", "40", workspace=ws)
    return ws


@pytest.fixture
def synth_copy(synth_ws: Path, tmp_path: Path) -> Path:
    shutil.copytree(synth_ws, tmp_path / "ws")
    return tmp_path / "ws"


def _corrupt_table(store: Path, table: str) -> None:
    """Flip bytes in every block that holds `table`'s rows, keeping the file's size."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
        blocks = {r[0] for r in con.execute(
            f"SELECT block_id FROM pragma_storage_info('{table}') WHERE persistent AND block_id >= 0").fetchall()}
    finally:
        con.close()
    assert blocks, f"{table} has no block on disk"
    before = store.stat().st_size
    with open(store, "r+b") as f:
        for b in blocks:
            at = 3 * 4096 + b * size + 64  # past its checksum, inside the rows (a partial block checks its used part)
            f.seek(at)
            data = f.read(16)
            f.seek(at)
            f.write(bytes(x ^ 0x5A for x in data))
    assert store.stat().st_size == before


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory) -> Path:
    """A workspace with a tiny dataset and one finished run `r` (for recommend, eval, report)."""
    ws = tmp_path_factory.mktemp("trained") / "ws"
    ds = make_dataset(ws)
    build_windows(ds, context=12, horizon=4)
    tiny = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=3, patience=0, lr=3e-3, warmup_steps=2)
    train(ds, TrainParams(priors=("item",), max_steps=3, **tiny), name="r", show_progress=False)
    return ws


# --- 1. an output path is never destructive ------------------------------------------------------

def _stand_ins(tmp_path: Path) -> dict[str, Path]:
    """A FIFO and a listening Unix socket under the temp dir: the stand-ins for /dev/null and friends."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    if len(str(sock_path)) > 100:  # AF_UNIX paths are short
        pytest.skip("temp dir too deep for a Unix socket")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return {"fifo": fifo, "sock": sock_path}


@pytest.mark.parametrize("kind", ["fifo", "sock", "dir"])
def test_recommend_out_refuses_what_is_not_a_regular_file(trained_ws: Path, tmp_path: Path, kind: str):
    target = tmp_path / "dir" if kind == "dir" else _stand_ins(tmp_path)[kind]
    target.mkdir() if kind == "dir" else None
    mode = target.stat().st_mode
    proc = run_cli("recommend", "r", "--all", "--out", str(target), workspace=trained_ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--out" in proc.stderr and "will not write over it" in proc.stderr
    assert target.stat().st_mode == mode  # still the FIFO / socket / folder it was
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_recommend_out_through_a_link_to_a_fifo_is_refused(trained_ws: Path, tmp_path: Path):
    link = tmp_path / "recs.parquet"
    link.symlink_to(_stand_ins(tmp_path)["fifo"])
    proc = run_cli("recommend", "r", "--all", "--out", str(link), workspace=trained_ws, check=False)
    assert proc.returncode == 2 and "named pipe" in proc.stderr
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)


@pytest.mark.parametrize("inside", ["store.duckdb", "runs/r/recs.parquet", "windows", "recs.parquet"])
def test_recommend_out_inside_the_dataset_is_refused(trained_ws: Path, tmp_path: Path, inside: str):
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    store = ws / "tiny" / "store.duckdb"
    before = store.read_bytes()
    proc = run_cli("recommend", "r", "--all", "--out", str(ws / "tiny" / inside), workspace=ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert store.read_bytes() == before
    assert not (ws / "tiny" / "runs" / "r" / "recs.parquet").exists() and not (ws / "tiny" / "recs.parquet").exists()


def test_recommend_out_under_reports_and_outside_is_written(trained_ws: Path, tmp_path: Path):
    for out in (trained_ws / "tiny" / "reports" / "recs.parquet", tmp_path / "recs.parquet"):
        proc = run_cli("recommend", "r", "--all", "--out", str(out), workspace=trained_ws, check=False)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0
    shutil.rmtree(trained_ws / "tiny" / "reports")


@pytest.mark.parametrize("kind", ["fifo", "file", "windows", "fifo-inside"])
def test_report_out_refuses_what_it_must_not_write_into(trained_ws: Path, tmp_path: Path, kind: str):
    if kind == "file":
        out = tmp_path / "notes.txt"
        out.write_text("mine")
    elif kind == "windows":
        out = trained_ws / "tiny" / "windows"
    elif kind == "fifo":
        out = _stand_ins(tmp_path)["fifo"]
    else:
        out = tmp_path / "report"
        out.mkdir()
        os.mkfifo(out / "table.md")
    proc = run_cli("report", "r", "--out", str(out), workspace=trained_ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    if kind == "file":
        assert out.read_text() == "mine"
    if kind == "fifo-inside":
        assert sorted(p.name for p in out.iterdir()) == ["table.md"]


_SIGTERM_AFTER_FIRST_CHUNK = """
import os, signal, sys
import mhr.ranking.recommend as rec
from mhr.cli import main
first = rec._export_chunk
def chunk(*args, **kwargs):
    table = first(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` or `docker stop` sends, mid-export
    return table
rec._export_chunk = chunk
rec.CHUNK_USERS = 4
main(sys.argv[1:])
"""


def test_sigterm_mid_export_leaves_no_temp_file(trained_ws: Path, tmp_path: Path):
    out = tmp_path / "out" / "recs.parquet"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_AFTER_FIRST_CHUNK, "--workspace", str(trained_ws),
                           "recommend", "r", "--all", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "terminated" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_a_rerun_removes_the_temp_file_of_a_killed_export(trained_ws: Path, tmp_path: Path):
    """kill -9 runs no clean-up: the next export to the same path removes what the dead one left."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "recs.parquet"
    left = tmp_path / f".recs.parquet.{dead.pid}.tmp"
    left.write_bytes(b"x" * 1000)
    alive = tmp_path / f".recs.parquet.{os.getpid()}.tmp"  # a live writer's: kept
    alive.write_bytes(b"y")
    run_cli("recommend", "r", "--all", "--out", str(out), workspace=trained_ws)
    assert not left.exists() and alive.exists() and out.is_file()


# --- 3. sizes from the user bounded before anything is allocated ---------------------------------

def test_recommend_top_beyond_the_catalogue_allocates_only_the_catalogue(trained_ws: Path):
    from mhr.ranking.recommend import rank_histories, recommend, scoring_for
    from mhr.training.runs import load_run
    from mhr.workspace import Workspace

    ds = Workspace(trained_ws).dataset("tiny")
    run = load_run(ds, "r")
    n_items = run.model.item_vectors().shape[0] - 1
    history = [(np.array([1, 2, 3]), np.array([1, 2, 3]))]
    ranked = rank_histories(run, history, np.array([1]), 10**7, scoring_for(run, "max"))
    assert ranked.items.shape == (1, n_items)  # not [1, 10⁷]
    recs, _ = recommend(run, ds, "u1", top=10**9)
    assert 0 < len(recs) <= n_items


def test_cli_top_of_a_billion_is_the_whole_catalogue(trained_ws: Path, tmp_path: Path):
    proc = run_cli("recommend", "r", "--user", "u1", "--top", "1000000000", workspace=trained_ws, check=False)
    assert proc.returncode == 0, proc.stderr
    assert 0 < len(proc.stdout.split()) <= 30
    out = tmp_path / "recs.parquet"
    run_cli("recommend", "r", "--all", "--out", str(out), "--top", "1000000000", workspace=trained_ws)
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("rank").to_numpy().max() <= 30


def test_eval_k_beyond_the_catalogue_ranks_only_the_catalogue(trained_ws: Path, monkeypatch):
    import mhr.ranking.inference as inference
    from mhr.ranking.evaluate import EvalParams, evaluate_run
    from mhr.training.runs import load_run
    from mhr.workspace import Workspace

    asked = []
    real = inference.grouped_fused_topk

    def spy(*args, **kwargs):
        asked.append(args[6])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "grouped_fused_topk", spy)
    ds = Workspace(trained_ws).dataset("tiny")
    run = load_run(ds, "r")
    result = evaluate_run(run, ds, EvalParams(ks=(10, 10**6)))
    assert asked and max(asked) <= 30
    whole = result["metrics"]
    assert set(whole) and all(np.isfinite(v) for v in _numbers(whole))


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_windows_context_beyond_every_history_is_refused_before_it_sizes_anything(trained_ws: Path, tmp_path: Path):
    from mhr.errors import UsageError
    from mhr.windows import build_windows
    from mhr.workspace import Workspace

    shutil.copytree(trained_ws, tmp_path / "ws")
    ds = Workspace(tmp_path / "ws").dataset("tiny")
    before = sorted(p.name for p in ds.windows_dir.iterdir())
    with pytest.raises(UsageError, match="--context 1000000000 is longer than any history"):
        build_windows(ds, context=10**9, horizon=4)
    assert sorted(p.name for p in ds.windows_dir.iterdir()) == before


def test_ndcg_with_a_huge_k_allocates_nothing_of_k():
    import tracemalloc

    from mhr.ranking.metrics import ndcg_at_k

    ranked, targets = np.array([[3, 1, 2]]), np.array([[1, 9]])
    tracemalloc.start()
    value = ndcg_at_k(ranked, targets, 10**7)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert value == pytest.approx(ndcg_at_k(ranked, targets, 3))
    assert peak < 1 << 20  # not 80 MB of discounts
    assert ndcg_at_k(ranked, targets, 10**23) == pytest.approx(value)  # past any C integer


# --- 4. non-finite numbers refused wherever a float comes in; never written into JSON ------------

@pytest.mark.parametrize("args", [("eval", "r", "--diversity", "nan"), ("eval", "r", "--diversity", "inf"),
                                  ("data", "synth", "--drift", "nan", "--name", "x"),
                                  ("priors", "build", "--kind", "item", "--threshold", "-inf"),
                                  ("train", "--lr", "nan", "--max-steps", "1")])
def test_cli_refuses_non_finite_floats(trained_ws: Path, args: tuple):
    proc = run_cli(*args, workspace=trained_ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "finite" in proc.stderr and "Traceback" not in proc.stderr
    assert not (trained_ws / "x").exists()


def test_every_float_option_of_every_command_refuses_nan():
    import typer.main

    from mhr.cli import app
    from mhr.cli.common import is_float_option, refuse_non_finite_floats
    from mhr.errors import UsageError

    command = typer.main.get_command(app)
    refuse_non_finite_floats(command)
    seen = []

    def walk(cmd, path):
        for param in cmd.params:
            if is_float_option(param):
                seen.append(f"{path} {param.name}")
                with pytest.raises(UsageError, match="finite"):
                    param.callback(None, param, float("nan"))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(command, "mhr")
    assert len(seen) >= 5  # synth's drift/noise, eval's diversity, priors' timeout/threshold, …


def test_eval_params_from_python_refuse_nan():
    from mhr.errors import UsageError
    from mhr.ranking.evaluate import EvalParams

    with pytest.raises(UsageError, match="--diversity nan"):
        EvalParams(diversity=float("nan")).check()


def test_prior_params_from_python_refuse_inf():
    from mhr.errors import UsageError
    from mhr.priors.build import make_params

    with pytest.raises(UsageError, match="--threshold inf"):
        make_params("item", {"threshold": float("inf")})


def test_list_options_refuse_nan():
    from mhr.cli.common import parse_list
    from mhr.errors import UsageError

    with pytest.raises(UsageError, match="finite"):
        parse_list("0.5,nan", float)


def test_json_artifacts_never_hold_nan_tokens(tmp_path: Path):
    from mhr.cache import dumps_json, write_json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    obj = {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"), "d": np.float64(2.0)}
    assert strict(dumps_json(obj)) == {"a": None, "b": [None, 1.5], "c": None, "d": 2.0}
    strict(write_json(tmp_path / "x.json", obj).read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --- 5. recipes say what they run ------------------------------------------------------------------

RECIPE = """
[recipe]
name = "t"
dataset = "d"
seeds = [0, 1]

[data]
command = "synth"
options = { users = 50, items = 40 }

[[priors]]
kind = "item"
name = "item"
top = 4

[windows]
context = 12
horizon = 4

[train]
max_steps = 1
lr = 0.002

[variants.base]
priors = []

[variants.item]
priors = ["item"]

[variants.item.grid]
gamma = [0.9, 0.99]

[eval]
fusion = ["max"]
baseline = "base"
k = [5, 10]
"""


def _recipe(tmp_path: Path, old: str = "", new: str = "") -> Path:
    assert old in RECIPE
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.replace(old, new, 1) if old else RECIPE)
    return path


def test_the_reference_recipe_and_every_shipped_one_pass_the_check(tmp_path: Path):
    from mhr.recipe import load_recipe

    load_recipe(_recipe(tmp_path))
    for path in sorted((Path(__file__).parents[1] / "stages").glob("*.toml")):
        load_recipe(path)


@pytest.mark.parametrize("old,new,fragment", [
    ("seeds = [0, 1]", "seed = [5]", "no key 'seed'.*did you mean 'seeds'"),
    ('fusion = ["max"]', 'fusions = ["avg"]', r"\[eval\] has no key 'fusions'.*did you mean 'fusion'"),
    ("[eval]", "[evals]", r"unknown section \[evals\]"),
    ("lr = 0.002", "lrr = 0.002", r"\[train\] has no key 'lrr'.*'lr'"),
    ('priors = ["item"]', 'prior = ["item"]', r"\[variants.item\] has no key 'prior'"),
    ("gamma = [0.9, 0.99]", "gamma = []", r"grid\] gamma is an empty list"),
    ("gamma = [0.9, 0.99]", "gama = [0.9]", r"grid\] has no key 'gama'"),
    ('baseline = "base"', 'baseline = "nope"', "baseline = 'nope' names no variant"),
    ("seeds = [0, 1]", 'seeds = "0"', "seeds = '0' is not a list of integers"),
    ("seeds = [0, 1]", "seeds = []", "seeds is empty"),
    ("lr = 0.002", 'lr = "fast"', "lr = 'fast' is not a number"),
    ("max_steps = 1", "max_steps = 1.5", "max_steps = 1.5 is not an integer"),
    ("k = [5, 10]", "k = []", r"\[eval\] k is an empty list"),
    ("k = [5, 10]", 'k = ["ten"]', "is not a list of integers"),
    ("top = 4", "tpo = 4", r"\[\[priors\]\] #1 has no key 'tpo'.*'top'"),
    ('kind = "item"', 'kind = "items"', "kind = 'items' is not a prior kind"),
    ("context = 12", "contxt = 12", r"\[windows\] has no key 'contxt'.*'context'"),
    ("users = 50", "usres = 50", "options has no key 'usres' for mhr data synth.*'users'"),
    ("lr = 0.002", "lr = nan", "lr = nan is not a number"),
])
def test_recipe_typos_are_refused_naming_the_key(tmp_path: Path, old: str, new: str, fragment: str):
    from mhr.errors import InputError
    from mhr.recipe import load_recipe

    with pytest.raises(InputError, match=fragment) as e:
        load_recipe(_recipe(tmp_path, old, new))
    assert e.value.exit_code == 2 and e.value.hint


def test_a_recipe_without_variants_is_refused(tmp_path: Path):
    from mhr.errors import InputError
    from mhr.recipe import load_recipe

    text = RECIPE.split("[variants.base]")[0] + "[variants]\n"
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(InputError, match="lists no variant"):
        load_recipe(tmp_path / "r.toml")


def test_a_recipe_that_is_not_utf8_is_refused(tmp_path: Path):
    from mhr.errors import InputError
    from mhr.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_bytes(RECIPE.replace('"t"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_recipe(path)


def test_every_eval_params_field_is_a_recipe_key(tmp_path: Path):
    """Keys come from EvalParams: a field added there (steering, calibration, …) is accepted at once."""
    import dataclasses

    from mhr.ranking.evaluate import EvalParams
    from mhr.recipe import EVAL_LISTS, load_recipe

    lines = []
    for f in dataclasses.fields(EvalParams):
        if f.name in ("ks", "baseline", *EVAL_LISTS) or f.default is None:
            continue
        value = f.default
        toml = (json.dumps(list(value)) if isinstance(value, tuple) else str(value).lower()
                if isinstance(value, bool) else json.dumps(value))
        lines.append(f"{f.name} = {toml}")
    load_recipe(_recipe(tmp_path, "k = [5, 10]", "k = [5, 10]\n" + "\n".join(lines)))


def test_cli_run_of_a_mistyped_recipe_exits_2_before_anything_runs(tmp_path: Path):
    ws = tmp_path / "ws"
    proc = run_cli("run", str(_recipe(tmp_path, "seeds = [0, 1]", "seed = [5]")), workspace=ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "seed" in proc.stderr and "Traceback" not in proc.stderr
    assert not ws.exists() or not any(ws.iterdir())


# --- 6. a disk that refuses a write (forced by a file-size limit) --------------------------------

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mhr.cli import main
main(sys.argv[2:])
"""


def _limited(limit: int, workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), "--workspace", str(workspace), *args],
                          capture_output=True, text=True, timeout=300)


def _one_disk_line(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr
    assert "free some space" in proc.stderr


def test_import_on_a_full_disk_is_one_line_and_keeps_nothing(tmp_path: Path):
    ws = tmp_path / "ws"
    _one_disk_line(_limited(1_000_000, ws, "data", "synth", "--users", "50", "--items", "40"))
    assert sorted(p.name for p in (ws / "synth").iterdir()) == [".lock"]


def test_priors_commit_on_a_full_disk_keeps_the_previous_prior(synth_copy: Path):
    run_cli("priors", "build", "--kind", "item", workspace=synth_copy)
    before = json.loads(run_cli("priors", "list", "--json", workspace=synth_copy).stdout)
    _one_disk_line(_limited(2000, synth_copy, "priors", "build", "--kind", "item", "--top", "3", "--force"))
    assert json.loads(run_cli("priors", "list", "--json", workspace=synth_copy).stdout) == before


def test_checkpoint_on_a_full_disk_is_one_line(trained_ws: Path, tmp_path: Path):
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    proc = _limited(20_000, ws, "train", "--name", "r2", "--max-steps", "3", "--backbone", "hstu", "--size", "tiny",
                    "--batch-size", "16", "--eval-every", "2", "--priors", "item")
    _one_disk_line(proc)
    assert not [p for p in (ws / "tiny" / "runs").rglob(".*tmp*")]


# --- 7. workspace paths with characters DuckDB reads specially --------------------------------------

@pytest.mark.parametrize("name", ["w?x", "w\\x"])
def test_workspace_with_a_duckdb_special_character_is_refused_before_anything_is_written(tmp_path: Path, name: str):
    ws = tmp_path / name
    proc = run_cli("data", "synth", "--users", "50", "--items", "40", workspace=ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "DuckDB" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
    proc = run_cli("status", workspace=None, env={"MHR_WORKSPACE": str(ws)}, check=False)
    assert proc.returncode == 2 and "DuckDB" in proc.stderr


def test_the_store_functions_refuse_such_a_path_too(tmp_path: Path):
    from mhr.errors import UsageError
    from mhr.store import new_store

    with pytest.raises(UsageError, match="'\\?'"):
        with new_store(tmp_path / "a?b" / "store.duckdb"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["w#x", "w'x", "w x", "w*x", "w[1]x", "w{a}x", "w%3Fx", "w:memory:"])
def test_workspaces_with_other_odd_characters_work(tmp_path: Path, name: str):
    from mhr.data.synth import synth_store
    from mhr.priors.build import build_prior, make_params
    from mhr.windows import build_windows
    from mhr.workspace import Workspace

    ds = Workspace.from_option(tmp_path / name).dataset("d")
    synth_store(ds, users=30, items=20, interactions=600)
    build_prior(ds, "item", make_params("item", {}))
    build_windows(ds, context=8, horizon=2)
    synth_store(ds, users=30, items=20, interactions=600, seed=1, discard_priors=True)  # a rebuild carries over
    assert ds.store_path.is_file()


# --- 2. a store damaged in place ----------------------------------------------------------------

@pytest.mark.parametrize("args", [("data", "show"), ("windows", "build"), ("status",), ("status", "--json")])
def test_store_with_flipped_bytes_is_damaged_for_every_command(synth_copy: Path, args: tuple):
    _corrupt_table(synth_copy / "synth" / "store.duckdb", "interactions")
    proc = run_cli(*args, workspace=synth_copy, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert "store.duckdb" in proc.stderr and "--force" in proc.stderr  # the file, and the way to rebuild


@pytest.mark.parametrize("args", [("recommend", "r", "--user", "u1"), ("windows", "build", "--context", "10")])
def test_a_damaged_store_mid_command_is_damaged_not_a_traceback(trained_ws: Path, tmp_path: Path, args: tuple):
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    _corrupt_table(ws / "tiny" / "store.duckdb", "interactions")
    proc = run_cli(*args, workspace=ws, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "damaged" in proc.stderr and "store.duckdb" in proc.stderr and "Traceback" not in proc.stderr
    verbose = run_cli("--verbose", *args, workspace=ws, check=False)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # --verbose still shows it


def test_status_does_not_list_the_stages_of_a_damaged_store_as_done(synth_copy: Path):
    _corrupt_table(synth_copy / "synth" / "store.duckdb", "interactions")
    proc = run_cli("status", "--json", workspace=synth_copy, check=False)
    record = json.loads(proc.stdout)[0]
    assert record["store_error"] and "damaged" in record["store_error"]["message"]
    assert record["stages"] == []


@pytest.mark.parametrize("table", ["interactions", "stage_runs"])
def test_the_rebuild_command_replaces_a_damaged_store(synth_copy: Path, table: str):
    store = synth_copy / "synth" / "store.duckdb"
    _corrupt_table(store, table)
    proc = run_cli("data", "synth", "--users", "50", "--items", "40", "--force", workspace=synth_copy, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_cli("data", "show", workspace=synth_copy, check=False).returncode == 0


# --- 8. the minor list ------------------------------------------------------------------------------

@pytest.mark.parametrize("error,state", [("busy", "busy"), ("unreadable", "unreadable")])
def test_status_lists_the_other_datasets_when_one_store_cannot_be_read(tmp_path: Path, monkeypatch, error: str,
                                                                        state: str):
    import mhr.status as status
    from mhr.errors import BusyError, DiskError, MhrError
    from mhr.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    for name in ("a", "b"):
        make_dataset(ws.root, name=name, n_users=10, with_priors=False)
    real = status.connect

    def connect(path, read_only=False):
        if path.parent.name == "a":
            raise (BusyError("busy: priors build (pid 1) is writing a") if error == "busy" else
                   DiskError(f"cannot read {path}: permission denied", hint="make the file readable"))
        return real(path, read_only=read_only)

    monkeypatch.setattr(status, "connect", connect)
    records = {r["dataset"]: r for r in status.collect_status(ws)}
    assert records["a"]["store_error"]["state"] == state
    assert "store_error" not in records["b"]
    if error == "busy":
        status.fail_if_damaged(list(records.values()))  # busy is no failure
    else:
        with pytest.raises(MhrError) as e:
            status.fail_if_damaged(list(records.values()))
        assert e.value.exit_code == 1


def test_an_unreadable_store_is_not_blamed_on_write_permission(tmp_path: Path):
    from mhr.store import _open_error

    e = _open_error(tmp_path / "store.duckdb", duckdb.IOException("IO Error: Permission denied"), read_only=True)
    assert "readable" in e.hint and "writable" not in e.hint


_HOLD_WRITER = """
import sys, time, duckdb
from mhr.workspace import Workspace, writing
ds = Workspace.from_option(sys.argv[1]).dataset("synth")
with writing(ds, "priors build"):
    con = duckdb.connect(str(ds.store_path))
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_reader_during_a_priors_build_is_told_which_command_holds_the_store(synth_copy: Path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_WRITER, str(synth_copy), "20"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        shown = run_cli("data", "show", workspace=synth_copy, check=False)
    finally:
        proc.kill()
        proc.wait()
    assert shown.returncode == 4, shown.stderr
    assert f"priors build (pid {proc.pid}) is writing synth" in shown.stderr


def test_windows_show_and_status_tell_damaged_windows(trained_ws: Path, tmp_path: Path):
    from mhr.cli.status import collect_status
    from mhr.windows import describe_windows
    from mhr.workspace import Workspace

    shutil.copytree(trained_ws, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    ds = ws.dataset("tiny")
    [wdir] = [d for d in ds.windows_dir.iterdir() if not d.name.startswith(".")]
    target = next(p for p in sorted(wdir.iterdir()) if p.name != "manifest.json" and p.stat().st_size > 64)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A
    target.write_bytes(bytes(data))
    assert describe_windows(ds)["damaged"]
    proc = run_cli("windows", "show", workspace=ws.root, check=False)
    assert "damaged" in proc.stderr
    assert {a["kind"]: a["state"] for a in collect_status(ws)[0]["artifacts"]}["windows"] == "damaged"


def test_status_marks_artifacts_of_replaced_data_stale(trained_ws: Path, tmp_path: Path):
    from mhr.cli.status import collect_status
    from mhr.workspace import Workspace

    shutil.copytree(trained_ws, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    assert {a["state"] for a in collect_status(ws)[0]["artifacts"]} == {"done"}
    make_dataset(ws.root, seed=1)
    assert {a["kind"]: a["state"] for a in collect_status(ws)[0]["artifacts"]} == {"windows": "stale", "run": "stale"}
    proc = run_cli("status", workspace=ws.root, check=False)
    assert proc.stderr.count("stale") >= 2


@pytest.mark.parametrize("change,fragment", [
    ({"gamma": -0.5}, "--gamma -0.5 must be in"),
    ({"negatives_per": "batch"}, "--negatives-per batch shapes a sampled softmax"),
    ({"logq": False}, "--no-logq shapes a sampled softmax"),
])
def test_train_options_that_would_be_dropped_are_refused(change: dict, fragment: str):
    from mhr.errors import UsageError

    with pytest.raises(UsageError, match=fragment):
        TrainParams(**change).check()


def test_a_full_softmax_run_recorded_with_old_sampler_values_still_reads_back():
    from mhr.training.params import RUN_KEY_RULES

    p = TrainParams.from_record({"priors": ["item"], "negatives": None})
    p.check()
    assert p.as_dict() == TrainParams(priors=("item",)).as_dict()
    assert RUN_KEY_RULES["logq"].historical is False  # what an old record lacking the field reads as


def test_cli_negative_checkpoint_every_and_resume_with_options(trained_ws: Path, tmp_path: Path):
    proc = run_cli("train", "--checkpoint-every", "-1", "--max-steps", "1", workspace=trained_ws, check=False)
    assert proc.returncode == 2 and "--checkpoint-every" in proc.stderr
    proc = run_cli("train", "--resume", "r", "--lr", "0.5", "--epochs", "3", workspace=trained_ws, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--epochs, --lr ignored" in proc.stderr


_CTRL_C_IN_TRAINING = """
import sys
import mhr.training.train as t
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
t._loop = interrupted
from mhr.cli import main
main(sys.argv[1:])
"""


def test_ctrl_c_during_training_says_how_to_resume(trained_ws: Path, tmp_path: Path):
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_IN_TRAINING, "--workspace", str(ws), "train", "--name",
                           "r9", "--max-steps", "2", "--size", "tiny", "--batch-size", "16", "--priors", "item"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "mhr train --resume r9" in proc.stderr and "Traceback" not in proc.stderr


def test_paper_rows_with_null_lists_are_counted(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    items = [[f"i{j}" for j in range(5)], None, [], [f"i{j}" for j in range(3, 8)]]
    ts = [list(range(5)), None, [], list(range(5))]
    pq.write_table(pa.table({"user_id": ["a", "b", "c", "d"], "item_id": items, "timestamp": ts}), path)
    proc = run_cli("data", "import", str(path), "--format", "paper", workspace=tmp_path / "ws", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "2 rows whose item_id list is null or empty were skipped" in proc.stderr


def test_a_unit_separator_byte_in_a_sequence_file_is_named(tmp_path: Path):
    path = tmp_path / "seq.txt"
    path.write_bytes(b"u1 a b c\nu2 a\x1fb c\nu3 c d\n")
    proc = run_cli("data", "import", str(path), "--format", "sequence", workspace=tmp_path / "ws", check=False)
    assert proc.returncode == 2
    assert "line 2" in proc.stderr and "0x1f" in proc.stderr


def test_ids_given_for_lookup_are_normalised_as_imports_normalise_them(trained_ws: Path, tmp_path: Path):
    import pyarrow as pa

    from mhr.data.dense import normalise_id, normalise_ids
    from mhr.ranking.recommend import read_user_file, recommend
    from mhr.ranking.service import Recommender
    from mhr.training.runs import load_run
    from mhr.workspace import Workspace

    raw = [" 42 ", "42.0", "-7.00", "abc", "1.5"]
    assert [normalise_id(r) for r in raw] == normalise_ids(pa.array(raw)).to_pylist()
    ds = Workspace(trained_ws).dataset("tiny")
    recs, _ = recommend(load_run(ds, "r"), ds, "  u1\t")
    assert recs
    (tmp_path / "users.txt").write_text("  u1 \nu2\n")
    assert read_user_file(tmp_path / "users.txt") == ["u1", "u2"]
    rec = Recommender.load(trained_ws, "tiny", "r")
    assert rec.recommend(["i1", " i2 "], user=" u3 ")
