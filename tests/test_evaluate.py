"""Evaluation, recommendation, report and recipes end to end on a tiny planted dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mhr.errors import NotFoundError, StaleError, UsageError
from mhr.ranking.evaluate import EvalParams, evaluate
from mhr.ranking.recommend import recommend
from mhr.recipe import run_recipe
from mhr.report import build_report
from mhr.store import connect, set_meta
from mhr.training.params import TrainParams
from mhr.training.runs import load_run
from mhr.training.train import train
from mhr.windows import build_windows
from mhr.workspace import Workspace
from tests.helpers import make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=4, patience=0, lr=3e-3,
            warmup_steps=2, max_steps=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev") / "ws"
    ds = make_dataset(root)
    build_windows(ds, context=12, horizon=4)
    for seed in (0, 1):
        train(ds, TrainParams(seed=seed, **TINY), name=f"base-s{seed}", show_progress=False)
        train(ds, TrainParams(priors=("temporal", "item"), seed=seed, **TINY), name=f"both-s{seed}",
              show_progress=False)
    train(ds, TrainParams(priors=("event",), **TINY), name="event", show_progress=False)
    train(ds, TrainParams(priors=("user",), **TINY), name="user", show_progress=False)
    return ds


def test_eval_metrics_and_cache(trained):
    path, result, cached = evaluate(trained, "both-s0", EvalParams(baseline="base-s0", ks=(5, 10, 50)))
    assert not cached and path.is_file()
    m = result["metrics"]
    assert m["users"] == 40
    for h in result["horizons"]:
        for k in (5, 10, 50):
            assert 0 <= m[f"ndcg@{k}/h{h}"] <= 1 and 0 <= m[f"recall@{k}/h{h}"] <= 1
        assert m[f"recall@5/h{h}"] <= m[f"recall@10/h{h}"] <= m[f"recall@50/h{h}"]
    assert result["horizons"] == [1, 2, 4]
    assert result["entropy"]["prior"] == "item" and result["entropy"]["H@10"] > 0
    assert "boost" in result["new_interest"]
    assert set(result["head_usage@10"]) == set(result["heads"])
    assert sum(result["head_usage@10"].values()) == pytest.approx(1.0)
    assert "user" in result["user_groups"]
    _, again, cached = evaluate(trained, "both-s0", EvalParams(baseline="base-s0", ks=(5, 10, 50)))
    assert cached and again == json.loads(path.read_text())


def test_fusion_avg_and_bad_fusion(trained):
    _, r, _ = evaluate(trained, "both-s0", EvalParams(fusion="avg", ks=(10,)))
    assert "head_usage@10" not in r
    with pytest.raises(UsageError, match="unknown fusion"):
        evaluate(trained, "both-s0", EvalParams(fusion="median"))


def test_oracle_is_labelled_and_only_for_event_runs(trained):
    _, r, _ = evaluate(trained, "event", EvalParams(oracle_event=True, ks=(10,)))
    assert r["oracle"] is True
    with pytest.raises(UsageError, match="event prior"):
        evaluate(trained, "both-s0", EvalParams(oracle_event=True, ks=(10,)))


def test_single_head_run_max_equals_avg(trained):
    _, a, _ = evaluate(trained, "base-s0", EvalParams(fusion="max", ks=(10,)))
    _, b, _ = evaluate(trained, "base-s0", EvalParams(fusion="avg", ks=(10,)))
    assert a["metrics"] == b["metrics"]


def test_history_excluded_by_default(trained):
    run = load_run(trained, "both-s0")
    from mhr.ranking.inference import rank_split

    split = run.windows.read_split("test")
    ranking = rank_split(run.model, run.compat, split, k=10)
    ptr, hist = split["history_ptr"], split["history_items"]
    for u in range(len(split["user"])):
        assert not set(ranking.items[u]) & set(hist[ptr[u]:ptr[u + 1]].tolist())
    kept = rank_split(run.model, run.compat, split, k=10, exclude_history=False)
    assert any(set(kept.items[u]) & set(hist[ptr[u]:ptr[u + 1]].tolist()) for u in range(len(split["user"])))


def test_recommend_explains_with_winning_head(trained):
    run = load_run(trained, "both-s0")
    recs, info = recommend(run, trained, "u3", top=5)
    assert len(recs) == 5 and [r.rank for r in recs] == [1, 2, 3, 4, 5]
    assert all(r.head in run.layout.names for r in recs)
    assert all(r.title.startswith("Item ") for r in recs)
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(NotFoundError, match="user 'nobody'"):
        recommend(run, trained, "nobody")


def test_recommend_cli_json(trained, cli):
    out = cli("--dataset", trained.name, "recommend", "run:both-s0", "--user", "u1", "--top", "3", "--json",
              workspace=trained.root)
    data = json.loads(out.stdout)
    assert len(data["items"]) == 3 and data["items"][0]["head"]


def test_report_writes_table_and_plots(trained, tmp_path):
    for name in ("base-s0", "base-s1", "both-s0", "both-s1"):
        evaluate(trained, name, EvalParams(ks=(10, 50)))
    index = build_report(trained, ["base-s0", "base-s1", "both-s0", "both-s1"], tmp_path / "rep")
    rows = json.loads((tmp_path / "rep" / "table.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "temporal+item"]
    assert all(r["seeds"] == 2 for r in rows)
    for f in ("training.png", "ndcg10.png", "projection.png", "table.md"):
        assert (tmp_path / "rep" / f).stat().st_size > 1000 or f == "table.md"
    assert "training.png" in index.read_text()
    page = (tmp_path / "rep" / "index.html").read_text()  # the same report, self-contained
    assert page.count('src="data:image/png;base64,') == index.read_text().count("](") and "temporal+item" in page


def test_eval_refuses_changed_dataset(tmp_path):
    ds = make_dataset(tmp_path / "ws")
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(**TINY), name="r", show_progress=False)
    con = connect(ds.store_path)
    set_meta(con, data_key="something-else")
    con.close()
    with pytest.raises(StaleError, match="another version"):
        evaluate(ds, "r", EvalParams())


def test_recipe_runs_then_does_nothing(tmp_path):
    ws = tmp_path / "ws"
    make_dataset(ws, name="tiny")
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[recipe]
name = "t"
dataset = "tiny"
seeds = [0]
[windows]
context = 12
horizon = 4
[train]
size = "tiny"
max_steps = 4
batch_size = 16
[variants.base]
priors = []
[variants.item]
priors = ["item"]
[eval]
fusion = ["max", "avg"]
baseline = "base"
k = [10]
""")
    first = run_recipe(recipe, Workspace(ws))
    assert first.runs == ["t-base-s0", "t-item-s0"] and first.report.is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (ws / "tiny" / "runs").rglob("*") if p.is_file()}
    second = run_recipe(recipe, Workspace(ws))
    assert second.runs == first.runs
    after = {p: p.stat().st_mtime_ns for p in (ws / "tiny" / "runs").rglob("*") if p.is_file()}
    assert stamps == after


# ---------------------------------------------------------------------------------------------
# fitted fusions, cold targets, subsets and masked means


def test_learned_and_invvar_fusion_fit_on_valid_and_cached(trained):
    from mhr.ranking.evaluate import eval_key
    from mhr.ranking.fusion_fit import fusion_path

    run = load_run(trained, "both-s0")
    for kind in ("learned", "invvar"):
        path, r, cached = evaluate(trained, "both-s0", EvalParams(fusion=kind, ks=(10,)))
        assert not cached and r["params"]["fusion"] == kind
        fit = r["fusion"]
        assert fit["kind"] == kind and fit["fitted_on"] == "valid" and fit["in_sample"] is False
        assert set(fit["scale" if kind == "learned" else "weights"]) == set(run.layout.names)
        assert 0 <= r["metrics"]["ndcg@10/h4"] <= 1 and "head_usage@10" not in r
        cache = fusion_path(run, kind)
        assert cache.is_file() and json.loads(cache.read_text())["key"] == fit["key"]
        stamp = cache.stat().st_mtime_ns
        # another evaluation of the same run reuses the fitted parameters
        _, r2, _ = evaluate(trained, "both-s0", EvalParams(fusion=kind, ks=(5,), split="valid"))
        assert r2["fusion"]["in_sample"] is True and cache.stat().st_mtime_ns == stamp
        assert {k: v for k, v in r2["fusion"].items() if k != "in_sample"} == \
               {k: v for k, v in fit.items() if k != "in_sample"}
        _, again, cached = evaluate(trained, "both-s0", EvalParams(fusion=kind, ks=(10,)))
        assert cached and again == json.loads(path.read_text())
    learned = fusion_path(run, "learned")
    info = json.loads(learned.read_text())["info"]
    assert info["ce_learned"] <= info["ce_avg"]
    keys = {eval_key(run, EvalParams(fusion=f, ks=(10,)), None) for f in ("max", "avg", "learned", "invvar")}
    assert len(keys) == 4


def test_fitted_fusions_on_one_head_equal_plain_scoring(trained):
    _, plain, _ = evaluate(trained, "base-s0", EvalParams(fusion="max", ks=(10,)))
    for kind in ("learned", "invvar"):
        _, r, _ = evaluate(trained, "base-s0", EvalParams(fusion=kind, ks=(10,)))
        assert r["metrics"] == plain["metrics"]
        assert list((r["fusion"].get("scale") or r["fusion"]["weights"]).values()) == [1.0]


def test_learned_with_baseline_fits_both(trained):
    _, r, _ = evaluate(trained, "both-s1", EvalParams(fusion="learned", baseline="base-s1", ks=(10,)))
    assert r["new_interest"]["baseline"]["fusion"]["kind"] == "learned"
    with pytest.raises(UsageError, match="oracle"):
        evaluate(trained, "event", EvalParams(fusion="learned", oracle_event=True))


def test_eval_cli_learned_end_to_end(trained, cli):
    out = cli("--dataset", trained.name, "eval", "run:both-s1", "--fusion", "learned", "--k", "10", "--json",
              workspace=trained.root)
    data = json.loads(out.stdout)
    assert data["params"]["fusion"] == "learned" and data["fusion"]["kind"] == "learned"
    assert "learned fusion fitted on valid" in out.stderr and "cold targets" in out.stderr


def test_metric_means_leave_out_users_without_targets():
    import numpy as np

    from mhr.ranking.evaluate import _metrics
    from mhr.ranking.inference import Ranking

    items = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    ranking = Ranking(items, np.zeros(items.shape, np.float32), -np.ones_like(items))
    targets = np.array([[1, 0], [0, 0], [0, 5]])
    m = _metrics(ranking, targets, [3], [1, 2])
    assert m["users"] == 2
    assert m["recall@3/h1"] == 1.0  # users 1 and 2 have no target within h1: left out, not zeros
    assert m["recall@3/h2"] == pytest.approx(0.5)  # user 2's target (a miss) counts within h2
    assert _metrics(ranking, targets, [3], [1], np.array([1])) == {"users": 0}
    assert _metrics(ranking, targets, [3], [1], np.array([], dtype=np.int64)) == {"users": 0}


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """Item 30 occurs only as a test target (the last interaction of users 1..5); a prior `all` puts
    every item in one category, so no user can have a new interest."""
    from tests.helpers import _prior_row

    ds = make_dataset(tmp_path_factory.mktemp("cold") / "ws", n_users=20)
    con = connect(ds.store_path)
    con.execute("UPDATE interactions SET item_id = 27 WHERE item_id = 30")
    con.execute("""UPDATE interactions SET item_id = 30 WHERE user_id <= 5 AND pos =
                   (SELECT max(pos) FROM interactions x WHERE x.user_id = interactions.user_id)""")
    _prior_row(con, "all", "item", {"all": True})
    con.execute("INSERT INTO prior_groups VALUES ('all', 0, 'everything')")
    con.execute("INSERT INTO item_groups SELECT 'all', item_id, 0 FROM items")
    con.close()
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(**{**TINY, "max_steps": 2, "eval_every": 2}), name="r", show_progress=False)
    return ds


def test_cold_targets_metrics(cold):
    import numpy as np

    from mhr.ranking.inference import rank_split
    from mhr.ranking.metrics import ndcg_at_k, recall_at_k

    _, r, _ = evaluate(cold, "r", EvalParams(ks=(10, 50)))
    c = r["cold"]
    assert c["items"] == 1 and c["targets"] == 5 and c["users"] == 5
    assert c["users_at"]["h4"] == 5 and c["metrics"]["users"] == 5
    run = load_run(cold, "r")
    split = run.windows.read_split("test")
    ranking = rank_split(run.model, run.compat, split, k=50)
    rows = np.flatnonzero((split["targets"] == 30).any(1))
    assert len(rows) == 5
    only = np.where(split["targets"][rows] == 30, 30, 0)
    for k in (10, 50):
        assert c["metrics"][f"recall@{k}/h4"] == pytest.approx(recall_at_k(ranking.items[rows], only, k).mean())
        assert c["metrics"][f"ndcg@{k}/h4"] == pytest.approx(ndcg_at_k(ranking.items[rows], only, k).mean())
    assert c["metrics"]["recall@50/h4"] == 1.0  # the catalogue has 30 items: every one is in the top 50
    # the validation targets hold no cold item: an empty subset, reported without NaN
    _, v, _ = evaluate(cold, "r", EvalParams(ks=(10,), split="valid"))
    assert v["cold"]["users"] == 0 and v["cold"]["metrics"] == {"users": 0}


def test_empty_new_interest_subset_does_not_crash(cold, capsys):
    from mhr.cli.evaluate import print_eval

    _, r, _ = evaluate(cold, "r", EvalParams(ks=(10,), entropy_prior="all", baseline="r"))
    ni = r["new_interest"]
    assert ni["share"] == 0.0 and ni["metrics"] == {"users": 0} and ni["boost"] == {}
    assert r["entropy"]["H@10"] == 0.0
    print_eval(r)
    assert "new-interest users 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# recommend with fitted fusions


def test_recommend_learned_and_invvar_use_evals_cached_fit(trained):
    import torch

    from mhr.ranking.fusion import head_contributions, scoring_args
    from mhr.ranking.fusion_fit import fusion_path, load_or_fit_fusion
    from mhr.ranking.scoring import grouped_fused_topk

    run = load_run(trained, "both-s0")
    for kind in ("learned", "invvar"):
        recs, info = recommend(run, trained, "u3", top=5, fusion=kind)
        assert info["fusion"] == kind and info["fitted_on"] == "valid"
        cache = fusion_path(run, kind)
        assert cache.is_file()  # fitted once, written where `mhr eval` reads it back
        stamp = cache.stat().st_mtime_ns
        again, _ = recommend(run, trained, "u3", top=5, fusion=kind)
        assert again == recs and cache.stat().st_mtime_ns == stamp
        scores = [r.score for r in recs]
        assert len(recs) == 5 and scores == sorted(scores, reverse=True)
        # the explanation: an eligible head of the item, the largest term of the fused score
        for r in recs:
            k = run.layout.names.index(r.head)
            assert bool(run.compat.omega[k, r.item_id]) and r.heads_fused >= 2  # ST and LT heads both score
        # the ranking is eval's: grouped_fused_topk with the fit's per-head parameters, and the
        # named head holds the largest term of each item's fused score
        fit = load_or_fit_fusion(run, kind)
        con = connect(trained.store_path, read_only=True)
        seq = con.execute("SELECT item_id, ts FROM interactions WHERE user_id = 4 ORDER BY pos").fetchnumpy()
        con.close()
        T = run.windows.params["context"]
        with torch.no_grad():
            items = torch.from_numpy(seq["item_id"].astype("int64"))
            q = run.model.last_queries(items[-T:][None], torch.from_numpy(seq["ts"].astype("int64"))[-T:][None],
                                       torch.tensor([min(T, len(items))])).float()
            vecs = run.model.item_vectors().float()
            exclude = torch.zeros(1, vecs.shape[0], dtype=torch.bool)
            exclude[0, items] = True
            heads = run.compat.users(torch.tensor([4]))
            want, want_scores, _ = grouped_fused_topk(q, vecs, run.model.scorer, run.compat.omega, heads, exclude,
                                                      5, **scoring_args(kind, fit))
            ids = torch.tensor([r.item_id for r in recs])
            assert ids.tolist() == want[0].tolist()
            assert [r.score for r in recs] == pytest.approx(want_scores[0].tolist(), abs=1e-6)
            allowed = run.compat.omega[:, ids][None] & heads[..., None]
            params = {k: v for k, v in scoring_args(kind, fit).items() if k != "fusion"}
            contrib, _ = head_contributions(run.model.scorer(q, vecs[ids]), allowed, **params)
            best = contrib.masked_fill(~allowed, float("-inf")).amax(dim=1)[0]
            named = contrib[0, [run.layout.names.index(r.head) for r in recs], torch.arange(5)]
            assert torch.equal(named, best)
            assert contrib.sum(dim=1)[0].tolist() == pytest.approx([r.score for r in recs], abs=1e-4)
    max_recs, info = recommend(run, trained, "u3", top=5)
    assert "fitted_on" not in info and all(r.heads_fused >= 1 for r in max_recs)
    avg_recs, _ = recommend(run, trained, "u3", top=5, fusion="avg")
    assert all(r.head in run.layout.names for r in avg_recs)
    with pytest.raises(UsageError, match="unknown fusion"):
        recommend(run, trained, "u3", fusion="median")


def test_recommend_cli_learned_explain(trained, cli):
    out = cli("--dataset", trained.name, "recommend", "run:both-s0", "--user", "u1", "--top", "3",
              "--fusion", "learned", "--explain", workspace=trained.root)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    run = load_run(trained, "both-s0")
    assert len(lines) == 3 and all(x["head"] in run.layout.names and x["heads_fused"] >= 1 for x in lines)
    assert "largest contribution" in out.stderr and "fitted on valid" in out.stderr
    bad = cli("--dataset", trained.name, "recommend", "run:both-s0", "--user", "u1", "--fusion", "median",
              workspace=trained.root, check=False)
    assert bad.returncode == 2 and "unknown fusion 'median'" in bad.stderr and not bad.stdout


def test_subset_split_matches_a_loop(trained):
    from mhr.windows import load_windows, subset_split

    split = load_windows(trained).read_split("test")
    rows = np.array([0, 3, 4, 17, 39])
    sub = subset_split(split, rows)
    for j, r in enumerate(rows):
        a, b = split["history_ptr"][r], split["history_ptr"][r + 1]
        c, d = sub["history_ptr"][j], sub["history_ptr"][j + 1]
        np.testing.assert_array_equal(sub["history_items"][c:d], split["history_items"][a:b])
        for key in ("user", "items", "targets", "length"):
            np.testing.assert_array_equal(sub[key][j], split[key][r])
    assert sub["history_ptr"][-1] == len(sub["history_items"])


def test_eval_on_a_user_sample_equals_the_full_ranking_on_those_users(trained):
    from mhr.ranking.evaluate import _metrics
    from mhr.ranking.fusion_fit import subsample
    from mhr.ranking.inference import rank_split

    run = load_run(trained, "both-s0")
    _, full, _ = evaluate(trained, "both-s0", EvalParams(ks=(10,)))
    _, part, _ = evaluate(trained, "both-s0", EvalParams(ks=(10,), sample_users=15))
    assert full["scored_users"] == full["split_users"] == 40
    assert part["scored_users"] == 15 and part["split_users"] == 40
    assert part["params"]["sample_users"] == 15 and "sample_users" not in full["params"]
    split = run.windows.read_split("test")
    ranking = rank_split(run.model, run.compat, split, k=10)
    rows = subsample(40, 15)
    expect = _metrics(ranking, split["targets"], [10], part["horizons"], rows)
    assert part["metrics"] == pytest.approx(expect)
    assert part["metrics"] != pytest.approx(full["metrics"])  # a different set of users
    with pytest.raises(UsageError, match="sample-users"):
        evaluate(trained, "both-s0", EvalParams(sample_users=0))


def test_per_target_group_metrics_match_a_loop(trained):
    from mhr.ranking.inference import rank_split
    from mhr.ranking.metrics import ndcg_at_k

    _, result, _ = evaluate(trained, "both-s0", EvalParams(ks=(10,)))
    tg = result["target_groups"]
    assert tg["prior"] == result["entropy"]["prior"] == "item"
    run = load_run(trained, "both-s0")
    split = run.windows.read_split("test")
    ranking = rank_split(run.model, run.compat, split, k=10)
    from mhr.priors.spec import load_prior
    from mhr.store import connect
    con = connect(trained.store_path, read_only=True)
    cat = load_prior(con, "item")
    con.close()
    h = result["horizons"][-1]
    counted = 0
    for g, name in enumerate(cat.group_names):
        scores = []
        for u in range(len(split["user"])):
            first = split["targets"][u, 0]
            if first > 0 and cat.item_groups[g, first]:
                t = split["targets"][u : u + 1, :h]
                scores.append(float(ndcg_at_k(ranking.items[u : u + 1], t, 10)[0]))
        got = tg["groups"][name]
        assert got["metrics"]["users"] == len(scores)
        counted += len(scores)
        if scores:
            assert got["metrics"][f"ndcg@10/h{h}"] == pytest.approx(np.mean(scores))
        assert 0 < got["item_share"] <= 1
    assert counted >= 40  # every user with a categorised first target counts at least once


def test_train_validates_on_a_seeded_user_sample(trained):
    """--valid-users N: early stopping and the kept weights are scored on a seeded sample of the
    valid split; the best validation figure is reproduced from the kept weights on that sample."""
    from mhr.ranking.inference import rank_split
    from mhr.ranking.metrics import ndcg_at_k
    from mhr.windows import sample_rows, subset_split

    train(trained, TrainParams(valid_users=9, **TINY), name="valid-sample", show_progress=False)
    plain = load_run(trained, "base-s0")
    loaded = load_run(trained, "valid-sample")
    assert loaded.config["params"]["valid_users"] == 9 and "valid_users" not in plain.config["params"]
    assert loaded.config["key"] != plain.config["key"]
    valid = loaded.windows.read_split("valid")
    sample = subset_split(valid, sample_rows(len(valid["user"]), 9))
    assert len(sample["user"]) == 9
    ranking = rank_split(loaded.model, loaded.compat, sample, k=10)
    best = json.loads((trained.runs_dir / "valid-sample" / "manifest.json").read_text())["best"]
    assert float(np.mean(ndcg_at_k(ranking.items, sample["targets"], 10))) == pytest.approx(best["valid_ndcg@10"], abs=1e-6)
    with pytest.raises(UsageError, match="valid-users"):
        TrainParams(valid_users=0, **TINY).check()
