"""Train at τ, evaluate at h ≤ H (paper Table 7): windows built with `--holdout H`, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from mhr.errors import UsageError
from mhr.ranking.evaluate import EvalParams, evaluate
from mhr.ranking.inference import rank_split
from mhr.ranking.metrics import ndcg_at_k, recall_at_k
from mhr.training.params import TrainParams
from mhr.training.runs import load_run
from mhr.training.train import train
from mhr.windows import build_windows, load_windows
from tests.helpers import make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=4, patience=0, lr=3e-3,
            warmup_steps=2, max_steps=6)
TAU, H = 2, 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout") / "ws"
    ds = make_dataset(root, horizon=TAU)  # the temporal prior covers the training horizon τ
    build_windows(ds, context=12, horizon=TAU, holdout=H)
    train(ds, TrainParams(**TINY), name="base", show_progress=False)
    train(ds, TrainParams(priors=("temporal", "item"), **TINY), name="both", show_progress=False)
    return ds


def test_training_keeps_tau_and_validates_on_the_held_out_targets(held):
    w = load_windows(held)
    assert (w.params["horizon"], w.holdout) == (TAU, H)
    assert w.read_split("train")["items"].shape[1] == 12 + TAU
    assert w.read_split("valid")["targets"].shape[1] == H
    run = load_run(held, "both")
    assert run.windows.key == w.key and run.layout.n_heads == 2 * 3  # ST/LT × 3 genres
    assert (run.path / "manifest.json").is_file()


def test_eval_scores_the_first_h_of_the_held_out_targets(held):
    _, r, _ = evaluate(held, "both", EvalParams(ks=(10,), horizons=(1, 2, 4)))
    assert r["horizons"] == [1, 2, 4]
    run = load_run(held, "both")
    split = run.windows.read_split("test")
    ranking = rank_split(run.model, run.compat, split, k=10)
    for h in (1, 2, 4):
        assert r["metrics"][f"ndcg@10/h{h}"] == pytest.approx(float(np.mean(ndcg_at_k(ranking.items, split["targets"][:, :h], 10))))
        assert r["metrics"][f"recall@10/h{h}"] == pytest.approx(float(np.mean(recall_at_k(ranking.items, split["targets"][:, :h], 10))))
    # the default horizons reach H: 1, τ/2, τ and H
    _, d, _ = evaluate(held, "base", EvalParams(ks=(10,)))
    assert d["horizons"] == [1, 2, 4]
    _, f, _ = evaluate(held, "both", EvalParams(ks=(10,), horizons=(4,), fusion="learned"))
    assert 0 <= f["metrics"]["ndcg@10/h4"] <= 1


def test_eval_refuses_horizons_beyond_the_holdout(held, cli):
    with pytest.raises(UsageError, match=r"--horizons \[8\] outside 1..4 .*H = 4; τ = 2") as e:
        evaluate(held, "both", EvalParams(ks=(10,), horizons=(1, 8)))
    assert "--holdout 8" in e.value.hint
    with pytest.raises(UsageError, match=r"outside 1..4"):
        evaluate(held, "both", EvalParams(ks=(10,), horizons=(0,)))
    bad = cli("--dataset", held.name, "eval", "run:both", "--horizons", "1,4,8", workspace=held.root, check=False)
    assert bad.returncode == 2 and not bad.stdout
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "outside 1..4" in errors[0]
