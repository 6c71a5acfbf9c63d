"""Decoding-time objectives (`mhr.ranking.objectives`): the quota re-ranking against a brute-force
optimum, Steck's calibrated greedy against a plain loop, parsing and the group distributions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mhr.errors import UsageError
from mhr.ranking.objectives import (
    Objectives,
    Steer,
    calibrated_rerank,
    group_mass,
    history_distribution,
    item_distribution,
    kl_calibration,
    list_distribution,
    parse_boost,
    parse_steer,
    quota_rerank,
    resolve_group,
)


def _sorted_case(rng, m: int, n_items: int):
    items = rng.permutation(np.arange(1, n_items + 1))[:m]
    scores = np.sort(rng.normal(size=m))[::-1].astype(np.float32)
    return items[None], scores[None].copy()


def _brute_best(items, scores, member, share, n):
    """Largest score sum of n candidates holding ≥ ceil(share·n) of the group (or all it has)."""
    in_g = member[items]
    need = min(math.ceil(share * n - 1e-9), int(in_g.sum()))
    best = -np.inf
    for combo in itertools.combinations(range(len(items)), n):
        if in_g[list(combo)].sum() >= need:
            best = max(best, float(scores[list(combo)].sum()))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_quota_rerank_is_the_brute_force_optimum_at_every_cutoff(seed):
    rng = np.random.default_rng(seed)
    m, n_items = int(rng.integers(4, 9)), 12
    items, scores = _sorted_case(rng, m, n_items)
    member = np.zeros(n_items + 1, dtype=bool)
    member[rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(1, 6)), replace=False)] = True
    share = float(rng.choice([0.2, 0.34, 0.5, 0.75, 1.0]))
    k = m
    cutoffs = sorted({int(rng.integers(1, k + 1)), k})
    pos = quota_rerank(items, scores, member[None], [share], k, cutoffs)[0]
    assert len(set(pos.tolist())) == k
    for n in cutoffs:
        got = float(scores[0, pos[:n]].sum())
        assert got == pytest.approx(_brute_best(items[0], scores[0], member, share, n), abs=1e-5)
    if cutoffs == [k]:  # one cut-off: the list stays in score order
        kept = scores[0, pos]
        assert (np.diff(kept[np.isfinite(kept)]) <= 1e-6).all()


def test_quota_holds_at_the_cutoff_not_at_every_prefix():
    items = np.array([[1, 2, 3, 4, 5, 6]])
    scores = np.array([[6, 5, 4, 3, 2, 1]], dtype=np.float32)
    member = np.zeros(7, dtype=bool)
    member[[6]] = True
    pos = quota_rerank(items, scores, member[None], [0.2], 5)[0]  # ceil(0.2 · 5) = 1 item of G in the top 5
    assert items[0, pos].tolist() == [1, 2, 3, 4, 6]  # the best item stays first; G's item enters last


def test_quota_rerank_swaps_lowest_others_for_best_group_items():
    items = np.array([[1, 2, 3, 4, 5, 6]])
    scores = np.array([[6, 5, 4, 3, 2, 1]], dtype=np.float32)
    member = np.zeros(7, dtype=bool)
    member[[5, 6]] = True
    pos = quota_rerank(items, scores, member[None], [0.5], 4)
    assert sorted(items[0, pos[0]].tolist()) == [1, 2, 5, 6]  # 3 and 4 swapped for 5 and 6
    assert quota_rerank(items, scores, member[None], [0.0], 4)[0].tolist() == [0, 1, 2, 3]  # share 0: plain


def test_several_quotas_greedy_meets_feasible_quotas():
    rng = np.random.default_rng(3)
    items, scores = _sorted_case(rng, 12, 12)
    a, b = np.zeros(13, bool), np.zeros(13, bool)
    a[[1, 2, 3]] = True
    b[[3, 4, 5, 6]] = True
    pos = quota_rerank(items, scores, np.stack([a, b]), [0.2, 0.3], 10)[0]
    top = items[0, pos]
    assert a[top].sum() >= 2 and b[top].sum() >= 3


def _steck_loop(items, probs, dist, p, k, lam, alpha=0.01):
    """Steck (2018), Algorithm: greedy argmax of (1-λ) Σ s - λ KL(p ‖ q̃), a plain loop."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_j = -np.inf, None
        for j in range(len(items)):
            if j in chosen:
                continue
            sel = chosen + [j]
            q = sum(dist[items[i]] for i in sel)
            q = q / q.sum() if q.sum() > 0 else q
            qt = (1 - alpha) * q + alpha * p
            kl = sum(p[g] * math.log(p[g] / qt[g]) for g in range(len(p)) if p[g] > 0)
            val = (1 - lam) * sum(probs[i] for i in sel) - lam * kl
            if val > best:
                best, best_j = val, j
        chosen.append(best_j)
    return chosen


def test_calibrated_greedy_equals_the_loop_reference_on_a_hand_checked_case():
    # 2 groups; the model's top 3 are all group A while the user is 50/50: calibration brings B in
    groups = np.zeros((2, 6), dtype=bool)
    groups[0, [1, 2, 3]] = True
    groups[1, [4, 5]] = True
    dist = item_distribution(groups)
    items = np.array([[1, 2, 3, 4, 5]])
    probs = np.array([[0.4, 0.3, 0.15, 0.1, 0.05]])
    p = np.array([[0.5, 0.5]])
    assert _steck_loop(items[0], probs[0], dist, p[0], 3, 0.0) == [0, 1, 2]  # λ = 0: the plain ranking
    ref = _steck_loop(items[0], probs[0], dist, p[0], 3, 0.5)
    assert ref == [0, 3, 1]  # by hand: A (0.4), then B balances (KL 0) before A's 0.3
    assert calibrated_rerank(items, probs, dist, p, 3, 0.5)[0].tolist() == ref


@pytest.mark.parametrize("seed", range(6))
def test_calibrated_greedy_equals_the_loop_on_random_multilabel_cases(seed):
    rng = np.random.default_rng(seed)
    n_items, g = 10, 3
    groups = rng.random((g, n_items + 1)) < 0.4
    groups[:, 0] = False
    dist = item_distribution(groups)
    items = rng.permutation(np.arange(1, n_items + 1))[None, :8]
    probs = np.sort(rng.dirichlet(np.ones(8)))[::-1][None]
    p = rng.dirichlet(np.ones(g))[None]
    lam = float(rng.choice([0.3, 0.7, 0.95]))
    assert calibrated_rerank(items, probs, dist, p, 5, lam)[0].tolist() == \
        _steck_loop(items[0], probs[0], dist, p[0], 5, lam)


def test_distributions_split_multilabel_items_evenly():
    groups = np.zeros((2, 4), dtype=bool)
    groups[0, [1, 2]] = True
    groups[1, [2]] = True  # item 2 in both; item 3 in none
    dist = item_distribution(groups)
    assert dist.tolist() == [[0, 0], [1, 0], [0.5, 0.5], [0, 0]]
    hist = history_distribution(np.array([0, 2, 3, 3]), np.array([1, 2, 3]), dist)
    assert hist.tolist() == [[0.75, 0.25], [0, 0], [0, 0]]  # user 2 has no history
    q = list_distribution(np.array([[2, 3, 1]]), dist, 2)
    assert q.tolist() == [[0.5, 0.5]]
    kl = kl_calibration(np.array([[0.75, 0.25]]), q)
    qt = 0.99 * np.array([0.5, 0.5]) + 0.01 * np.array([0.75, 0.25])
    assert kl[0] == pytest.approx(0.75 * math.log(0.75 / qt[0]) + 0.25 * math.log(0.25 / qt[1]))


def test_group_mass_of_a_partition_sums_to_one_and_equals_softmax_mass():
    groups = np.zeros((3, 7), dtype=bool)
    groups[0, [1, 2]] = groups[1, [3, 4, 5]] = groups[2, [6]] = True
    logits = torch.randn(2, 7).masked_fill(torch.arange(7) == 0, float("-inf"))
    probs = torch.softmax(logits, 1)
    mass = group_mass(probs, torch.from_numpy(item_distribution(groups)))
    assert torch.allclose(mass.sum(1), torch.ones(2, dtype=torch.float64))
    assert mass[:, 1].float() == pytest.approx(probs[:, [3, 4, 5]].sum(1).tolist())


@pytest.mark.parametrize("text", ["genre", "genre:Comedy", "genre:Comedy=abc", "genre:Comedy=nan",
                                  "genre:Comedy=inf", "genre:Comedy=1.5", "genre:Comedy=-0.1", ":x=0.1"])
def test_bad_steer_names_the_flag(text):
    with pytest.raises(UsageError, match="--steer") as e:
        parse_steer(text)
    assert e.value.exit_code == 2


def test_parsing_and_groups():
    assert parse_steer("genre6:Children's=0.2") == Steer("genre6", "Children's", 0.2)
    assert parse_boost("g:Drama=-1.5").beta == -1.5
    with pytest.raises(UsageError, match="--boost"):
        parse_boost("g:Drama=inf")
    assert resolve_group("Comedy", ("Action", "Comedy"), "g", "--steer") == 1
    assert resolve_group("0", ("Action", "Comedy"), "g", "--steer") == 0
    with pytest.raises(UsageError, match="--steer: prior 'g' has no group 'Horror'"):
        resolve_group("Horror", ("Action", "Comedy"), "g", "--steer")
    with pytest.raises(UsageError, match="--calibrate-lambda"):
        Objectives(calibrate="g", calibrate_lambda=1.5).check()
    with pytest.raises(UsageError, match="--steer and --calibrate"):
        Objectives(steer=(Steer("g", "a", 0.1),), calibrate="g").check()


def test_objective_metrics_on_hand_computed_lists():
    from mhr.ranking.metrics import category_coverage, group_share, miscalibration, quota_met

    groups = np.zeros((3, 7), dtype=bool)
    groups[0, [1, 2]] = groups[1, [3, 4]] = groups[2, [5, 6]] = True
    ranked = np.array([[1, 3, 2, 0], [5, 6, 1, 2]])
    member = groups[0]
    assert group_share(ranked, member, 4).tolist() == [0.5, 0.5]
    assert group_share(ranked, member, 2).tolist() == [0.5, 0.0]
    assert quota_met(ranked, member, 0.5, 2).tolist() == [True, False]  # needs ceil(0.5·2) = 1
    assert quota_met(ranked, member, 0.3, 4).tolist() == [True, True]  # ceil(1.2) = 2
    assert category_coverage(ranked, groups, 4).tolist() == pytest.approx([2 / 3, 2 / 3])
    assert category_coverage(ranked[1], groups, 2) == pytest.approx(1 / 3)
    # user 0: history {1, 3} -> p = (½, ½, 0); top 2 = {1, 3} -> q = p: C_KL = 0
    # user 1: history {1} -> p = (1, 0, 0); top 2 = {5, 6} -> q = (0, 0, 1), q̃_0 = 0.01: log(1/0.01)
    # user 2: no history: undefined
    kl, defined = miscalibration(np.array([[1, 3], [5, 6], [1, 2]]), np.array([0, 2, 3, 3]),
                                 np.array([1, 3, 1]), groups, 2)
    assert defined.tolist() == [True, True, False]
    assert kl[0] == pytest.approx(0.0) and kl[1] == pytest.approx(math.log(100))


def test_report_objective_curves_along_a_sweep(tmp_path):
    import json

    from mhr.report import RunGroup, _find_eval, objective_points, plot_objectives
    from mhr.workspace import Workspace

    ds = Workspace(tmp_path).dataset("d")

    def write(run, name, params, ndcg, **extra):
        d = ds.runs_dir / run / "eval"
        d.mkdir(parents=True, exist_ok=True)
        ev = {"split": "test", "horizons": [4], "params": {"fusion": "max", **params},
              "metrics": {"ndcg@10/h4": ndcg}, **extra}
        (d / f"{name}.json").write_text(json.dumps(ev))

    for run, shift in (("a-s0", 0.0), ("a-s1", 0.02)):
        write(run, "plain", {}, 0.30 + shift)
        for share, ndcg, got in ((0.0, 0.30, 0.05), (0.2, 0.28, 0.2), (0.4, 0.25, 0.4)):
            write(run, f"s{share}", {"steer": [f"g:Kids={share:g}"]}, ndcg + shift,
                  steer={f"g:Kids={share:g}": {"@10": {"share": got, "met": 1.0}}})
        for lam, ndcg, kl in ((0.5, 0.29, 0.4), (0.9, 0.27, 0.2)):
            write(run, f"c{lam}", {"calibrate": "g", "calibrate_lambda": lam}, ndcg + shift, c_kl={"@10": kl})
    curves = objective_points(ds, [RunGroup("heads", {}, ["a-s0", "a-s1"])])
    assert curves["steer"]["heads · g:Kids"] == [
        (0.0, pytest.approx(0.31), pytest.approx(0.05)), (0.2, pytest.approx(0.29), pytest.approx(0.2)),
        (0.4, pytest.approx(0.26), pytest.approx(0.4))]
    assert [pt[0] for pt in curves["calibrate"]["heads · g"]] == [0.5, 0.9]
    assert "boost" not in curves
    assert _find_eval(ds.runs_dir / "a-s0", "test", "max")["metrics"]["ndcg@10/h4"] == 0.30  # the plain one
    assert plot_objectives(curves, tmp_path / "o.png") and (tmp_path / "o.png").stat().st_size > 0


def test_recipe_eval_section_sweeps_objectives_and_logs_repeatable_flags():
    from mhr.ranking.evaluate import EvalParams
    from mhr.recipe import _objective_extras, eval_command

    extras = _objective_extras({"steer": ["g:A=0", "g:A=0.2"], "boost": "g:B=1", "calibrate": "g",
                                "calibrate_lambda": [0.3, 0.9], "diversity": [0.5]})
    assert extras == [{"steer": ("g:A=0",)}, {"steer": ("g:A=0.2",)}, {"boost": ("g:B=1",)},
                      {"calibrate": "g", "calibrate_lambda": 0.3}, {"calibrate": "g", "calibrate_lambda": 0.9}]
    params = EvalParams(ks=(10,), steer=("g:A=0.2", "h:B=0.1"), calibrate_lambda=0.5)
    assert eval_command("r", params) == ["eval", "r", "--k", "10", "--steer", "g:A=0.2", "--steer", "h:B=0.1"]


def test_eval_keys_without_objectives_are_unchanged():
    """Golden keys, computed before the objectives existed: cached evaluations are still found."""
    from mhr.cache import stage_key
    from mhr.ranking.evaluate import EvalParams, _jsonable

    assert stage_key("eval", _jsonable(EvalParams()), {"run": "k"}) == \
        "99b1884f761039975f169921f833a79643190a1814d5c1be7cf1140cda57233e"
    p = EvalParams(fusion="avg", ks=(10,), horizons=(1, 2), diversity=0.5, entropy_prior="item", oracle_group="g",
                   sample_users=10, baseline="b")
    assert stage_key("eval", _jsonable(p), {"run": "k"}) == \
        "160884bf010bebcbf0181eb42397dd2ee4d43ca6c8b3e08c0e99e1d974b4cb22"
    steered = _jsonable(EvalParams(steer=("g:A=0.20",)))
    assert steered["steer"] == ["g:A=0.2"] and "calibrate" not in steered  # canonical texts in the key


def test_cli_builds_eval_flags_without_torch():
    import subprocess
    import sys

    code = "import sys, mhr.cli; print('torch' in sys.modules)"  # registers every command, eval's flags too
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
