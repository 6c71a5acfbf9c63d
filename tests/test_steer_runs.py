"""Objectives on trained runs (`mhr.ranking.decode`): boosts equal the dense reference with β added,
steering meets quotas, the interest profile, the API and the CLI flags (`mhr eval`, `mhr recommend`)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mhr import Recommender
from mhr.errors import UsageError
from mhr.ranking.decode import interest_profile, profile_priors, rank_objectives, resolve
from mhr.ranking.fusion import fuse_dense
from mhr.ranking.inference import history_mask, iter_queries
from mhr.ranking.objectives import Boost, Objectives, Steer, item_distribution
from mhr.ranking.recommend import profile_path
from mhr.store import connect
from mhr.training.params import TrainParams
from mhr.training.runs import load_run
from mhr.training.train import train
from mhr.windows import build_windows
from tests.helpers import GENRES, _prior_row, make_dataset
from tests.test_recommend_export import TINY, in_process


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("steer") / "ws"
    ds = make_dataset(root, n_users=40)
    with connect(ds.store_path) as con:  # a partition prior: each item's first genre only
        _prior_row(con, "genre1", "item", {"first_genre": True})
        con.execute("INSERT INTO prior_groups SELECT 'genre1', group_id, name FROM prior_groups WHERE prior = 'item'")
        con.execute("INSERT INTO item_groups SELECT 'genre1', item_id, min(group_id) FROM item_groups "
                    "WHERE prior = 'item' GROUP BY item_id")
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(priors=(), **TINY), name="base", show_progress=False)
    train(ds, TrainParams(priors=("item",), **TINY), name="heads", show_progress=False)
    return ds


@torch.no_grad()
def _dense_topk(run, split, k, head_beta=None, item_bonus=None):
    """The reference: every head scores every item, β added to the boosted heads' scores (or to the
    items' fused scores), fused by `fuse_dense`, history excluded, top k."""
    vecs = run.model.item_vectors().float()
    omega = run.compat.omega.clone()
    omega[:, 0] = False
    out = []
    for rows, q, heads in iter_queries(run.model, run.compat, split):
        s = run.model.scorer(q, vecs).float()
        if head_beta is not None:
            s = s + torch.as_tensor(head_beta, dtype=torch.float32)[None, :, None]
        fused, _ = fuse_dense(s, omega.unsqueeze(0) & heads.unsqueeze(-1), "max")
        if item_bonus is not None:
            fused = fused + torch.as_tensor(item_bonus, dtype=torch.float32)
        fused = fused.masked_fill(history_mask(split, rows, vecs.shape[0] - 1), float("-inf"))
        fused[:, 0] = float("-inf")
        out.append(fused.topk(k, dim=1).indices)
    return torch.cat(out).numpy()


def test_head_boost_equals_beta_added_to_those_heads_in_the_dense_reference(runs):
    run = load_run(runs, "heads")
    resolved = resolve(Objectives(boost=(Boost("item", "Comedy", 3.0),)), run, runs)
    assert resolved.item_bonus is None
    expected = [3.0 if "Comedy" in n else 0.0 for n in run.layout.names]
    assert resolved.head_boost.tolist() == expected and sum(expected) == 3.0
    split = run.windows.read_split("test")
    got = rank_objectives(run, split, 8, {"fusion": "max"}, resolved)
    ref = _dense_topk(run, split, 8, head_beta=expected)
    assert (got.items == ref).mean() > 0.99  # float ties aside
    plain = rank_objectives(run, split, 8, {"fusion": "max"}, None)
    assert not np.array_equal(plain.items, got.items)


def test_item_boost_on_a_plain_backbone_equals_the_dense_reference(runs):
    run = load_run(runs, "base")
    resolved = resolve(Objectives(boost=(Boost("item", "Drama", 2.0), Boost("genre1", "0", -1.0))), run, runs)
    assert resolved.head_boost is None
    split = run.windows.read_split("test")
    got = rank_objectives(run, split, 8, {"fusion": "max"}, resolved)
    ref = _dense_topk(run, split, 8, item_bonus=resolved.item_bonus)
    assert (got.items == ref).mean() > 0.99


@pytest.mark.parametrize("name", ["base", "heads"])
def test_steer_meets_the_quota_at_every_cut_off(runs, name):
    run = load_run(runs, name)
    resolved = resolve(Objectives(steer=(Steer("genre1", "Action", 0.5),)), run, runs)
    split = run.windows.read_split("test")
    got = rank_objectives(run, split, 10, {"fusion": "max"}, resolved, cutoffs=(1, 4, 10))
    member = resolved.steer_members[0]
    seen = history_mask(split, np.arange(len(split["user"])), len(member) - 1).numpy()
    available = (member[None, :] & ~seen).sum(1)  # the group's candidates: not in the history
    assert (available < 5).any() and (available >= 5).any()  # both cases occur
    for n in (1, 4, 10):
        assert (member[got.items[:, :n]].sum(1) >= np.minimum(np.ceil(0.5 * n), available)).all()
    only_ten = rank_objectives(run, split, 10, {"fusion": "max"}, resolved)  # the quota at K = 10 alone
    assert (member[only_ten.items].sum(1) >= np.minimum(5, available)).all()
    assert (member[only_ten.items[:, 0]].sum() < member[got.items[:, 0]].sum())  # not forced at the top
    filled = got.items > 0
    assert all(len(set(r[f].tolist())) == f.sum() for r, f in zip(got.items, filled, strict=True))


def test_profile_of_a_plain_backbone_is_its_softmax_mass_over_a_partition(runs):
    run = load_run(runs, "base")
    split = run.windows.read_split("test")
    spec = profile_priors(run, runs, ["genre1"])[0]
    prof = interest_profile(run, split, {"fusion": "max"}, [spec])["genre1"]
    assert np.allclose(prof.sum(1), 1.0)
    vecs = run.model.item_vectors().float().detach()
    rows, q, _ = next(iter_queries(run.model, run.compat, split))
    logits = run.model.scorer(q, vecs)[:, 0].masked_fill(history_mask(split, rows, vecs.shape[0] - 1), float("-inf"))
    logits[:, 0] = float("-inf")
    p = torch.softmax(logits, 1).detach()
    assert np.allclose(prof[rows, 1], p[:, spec.item_groups[1]].sum(1).numpy(), atol=1e-5)
    assert np.allclose(item_distribution(spec.item_groups).sum(1)[1:], 1.0)  # a partition


def test_api_objectives_and_profile(runs):
    rec = Recommender.load(runs.root, runs.name, "heads")
    hist = ["i0", "i3", "i6", "i9"]
    plain = rec.recommend(hist, top=6)
    def comedies(recs) -> int:
        return sum("Comedy" in (r.title or "").split("(")[1].split("/")[0] for r in recs)

    steered = rec.recommend(hist, top=6, objectives=Objectives(steer=(Steer("genre1", "Comedy", 0.5),)))
    assert comedies(steered) >= 3
    assert comedies(plain) < 6  # so a quota of every item changes the list
    assert rec.recommend(hist, top=6, objectives=Objectives(steer=(Steer("genre1", "Comedy", 1.0),))) != plain
    prof = rec.profile(hist)
    assert list(prof) == ["item"] and set(prof["item"]) == {"Action", "Comedy", "Drama"}
    assert list(prof["item"].values()) == sorted(prof["item"].values(), reverse=True)
    with pytest.raises(UsageError, match="--steer: prior 'item' has no group 'Horror'"):
        rec.recommend(hist, objectives=Objectives(steer=(Steer("item", "Horror", 0.2),)))
    with pytest.raises(UsageError, match="--boost: prior 'temporal' is a temporal prior"):
        rec.recommend(hist, objectives=Objectives(boost=(Boost("temporal", "ST", 1.0),)))


def _eval(ds, *args):
    code, out, err = in_process(ds, "eval", *args, "--k", "5,10", "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", ["base", "heads"])
def test_eval_cli_steer_and_calibrate(runs, name):
    plain = _eval(runs, name)
    steered = _eval(runs, name, "--steer", "genre1:Action=0.5")
    cell = steered["steer"]["genre1:Action=0.5"]["@10"]
    assert cell["share"] >= 0.45 and cell["met"] > plain.get("met", 0)
    assert "steer" not in plain and "steer" in steered["params"] and "steer" not in plain["params"]
    calibrated = _eval(runs, name, "--calibrate", "genre1", "--calibrate-lambda", "0.99")
    assert calibrated["c_kl"]["prior"] == "genre1" and plain["c_kl"]["prior"] == "item"
    base_kl = _eval(runs, name, "--entropy-prior", "genre1")["c_kl"]["@10"]
    assert calibrated["c_kl"]["@10"] < base_kl
    boosted = _eval(runs, name, "--boost", "item:Drama=5")
    assert boosted["metrics"] != plain["metrics"]
    assert 0 < plain["category_coverage"]["@10"] <= 1


@pytest.mark.parametrize(("args", "flag"), [
    (["--steer", "nope:Action=0.2"], "--steer"),
    (["--steer", "item:Horror=0.2"], "--steer"),
    (["--steer", "item:Action=1.5"], "--steer"),
    (["--steer", "item:Action=nan"], "--steer"),
    (["--boost", "item:Action=inf"], "--boost"),
    (["--boost", "temporal:ST=1"], "--boost"),
    (["--calibrate", "user"], "--calibrate"),
    (["--calibrate", "item", "--calibrate-lambda", "2"], "--calibrate-lambda"),
])
@pytest.mark.parametrize("command", ["eval", "recommend"])
def test_bad_objective_flags_exit_2_naming_the_flag(runs, args, flag, command):
    target = ["--user", "u1"] if command == "recommend" else []
    code, _, err = in_process(runs, command, "heads", *target, *args)
    assert code == 2 and flag in err, err


def test_recommend_explain_shows_the_profile_and_export_writes_it(runs, tmp_path):
    code, out, err = in_process(runs, "recommend", "heads", "--user", "u1", "--explain", "--steer", "item:Drama=0.5")
    assert code == 0, err
    assert re.search(r"item: (Action|Comedy|Drama) · \d+%.* of your predicted interest", err), err
    code, out, err = in_process(runs, "recommend", "heads", "--user", "u1", "--explain", "--json")
    info = json.loads(out)
    assert set(info["profile"]["item"]) == set(GENRES) and info["profile"]["item"]
    dest = tmp_path / "recs.parquet"
    code, _, err = in_process(runs, "recommend", "base", "--all", "--out", str(dest), "--explain", "--top", "4",
                              "--steer", "genre1:Comedy=0.5")
    assert code == 0, err
    prof = pq.read_table(profile_path(dest)).to_pylist()
    by_user = {}
    for r in prof:
        if r["prior"] == "genre1":
            by_user[r["user"]] = by_user.get(r["user"], 0.0) + r["p"]
    assert len(by_user) == 40 and all(abs(v - 1) < 1e-4 for v in by_user.values())
    recs = pq.read_table(dest).to_pylist()
    assert json.loads(pq.read_schema(dest).metadata[b"mhr"])["objectives"]["steer"] == ["genre1:Comedy=0.5"]
    assert len(recs) == 40 * 4


def test_router_run_profile_is_the_routers_group_mass_and_boosts_shift_its_offsets(runs):
    train(runs, TrainParams(priors=("item",), router=True, **TINY), name="routed", show_progress=False)
    run = load_run(runs, "routed")
    split = run.windows.read_split("test")
    spec = profile_priors(run, runs, ["item"])[0]
    prof = interest_profile(run, split, {"fusion": "router"}, [spec])["item"]
    _, _, _, log_p = next(iter_queries(run.model, run.compat, split, route=True))
    p = log_p.exp().detach().numpy()
    for g, name in enumerate(spec.group_names):
        heads = [k for k, n in enumerate(run.layout.names) if n == name]
        assert np.allclose(prof[: len(p), g], p[:, heads].sum(1), atol=1e-6)
    resolved = resolve(Objectives(boost=(Boost("item", "Drama", 4.0),)), run, runs)
    plain = rank_objectives(run, split, 8, {"fusion": "router"}, None)
    boosted = rank_objectives(run, split, 8, {"fusion": "router"}, resolved)
    drama = spec.item_groups[2]
    assert drama[boosted.items].sum() > drama[plain.items].sum()
    code, out, err = in_process(runs, "eval", "routed", "--fusion", "router", "--calibrate", "item", "--json")
    assert code == 0 and json.loads(out)["c_kl"]["prior"] == "item", err
