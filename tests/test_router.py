"""The joint router (p(k | h) over heads), routed fusion, the group oracle, and run keys."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mhr.cache import stage_key
from mhr.models.heads import Compatibility, HeadRouter, build_layout, dot_scores
from mhr.priors.spec import PriorSpec
from mhr.ranking.evaluate import EvalParams, evaluate
from mhr.ranking.fusion import fuse_dense, head_log_normalisers, router_offsets
from mhr.ranking.scoring import dense_fused_topk, grouped_fused_topk
from mhr.training.loss import router_loss
from mhr.training.params import TrainParams
from mhr.training.runs import load_run
from mhr.training.train import train
from mhr.windows import build_windows
from tests.helpers import make_dataset

# Keys computed by the code before any sampling or router field existed: no cached run may change key.
GOLDEN = {
    "base": ({}, "86507277e685c0f2b72fc09ce03949a1b41a1063329aeb6ad8ec3027353b11ce"),
    "both_full": ({"priors": ("temporal", "item"), "compose": "hierarchical", "epochs": 6, "lr": 0.002},
                  "66d2e7d075fdcb5c3c57381c5ef62b804e3e43f707872aa8de938e931944d966"),
    # runs with sampled negatives were trained before the sampler had options: one shared draw per
    # batch, uncorrected (today's defaults differ, so the historical setting is spelled out)
    "sampled256": ({"negatives": 256, "epochs": 8, "lr": 0.002, "negatives_per": "batch", "logq": False},
                   "7daa5092d41f37dfb95a8d5d145089db64df462f4203abf98e92ff4557a99dad"),
    "heads_sampled_global": ({"priors": ("item",), "negatives": 128, "negatives_from": "global",
                              "negatives_per": "batch", "logq": False},
                             "f84e19793bd05f28d9474e2f31d0936cafc6bc0784bfab0efe4c44eff5298b41"),
    "remi": ({"decoder": "remi", "interests": 8, "negatives": 256, "beta": 1.0, "negatives_per": "batch",
              "logq": False},
             "75506e39c016163429bc016bd3e450e98a326f912e91fa874305f75060a9a6c1"),
    "hllm": ({"backbone": "hllm", "priors": ("item",)},
             "46cfba711654e108ffa637b628b90c1a839dac6c6f811d5128f0b62fab8cfd95"),
    "sasrec": ({"backbone": "sasrec", "size": "1", "batch_size": 128},
               "c44aab41b3e8923d37e0ed9c75ea0f61f177f584ea06fdc29cf83e033c34576a"),
    # keyed by the code before `RUN_KEY_RULES` replaced its hand-written omissions (commit b6a56fe)
    "dualvae": ({"decoder": "dualvae", "interests": 3, "kl_weight": 0.4},
                "f5ff45a2c8248ac6531a73a3a0120c7d31766c28045d20cceacda4549321851f"),
    "comirec_inbatch": ({"decoder": "comirec", "routing_reg": 0.5, "negatives": 32, "negatives_per": "sequence",
                         "in_batch_negatives": True},
                        "28aaa5788d1bca26293a1a9e1f12fc4f738628071e067149a6a76eb885366226"),
    "hllm_finetuned": ({"backbone": "hllm", "train_item_llm": True, "negatives": 64},
                       "fbf76eab986531c01ad6db956251b8f59fd6d664f2580f185b36dee2fc438c67"),
    "router_weighted": ({"priors": ("item",), "router": True, "router_weight": 0.5},
                        "eee2361a3a769fd4ab62d854e277acbfff9346aae9cf0fc9849a8fc06ad3d8e5"),
    "global_head_mixed": ({"global_head": True, "priors": ("item",), "negatives": 8, "negatives_from": "global",
                           "global_ratio": 0.3},
                          "f923cc30ae3e990e627d660f7b6d82f72f21757052440964a848ab4e78688b9d"),
    "heads_beta": ({"beta": 1.0, "negatives": 10},
                   "db1125dc3772f49181db7b00200ce7b32b05be7d8dd4af5842eecc73ce444aee"),
    "additive_sampled": ({"priors": ("temporal", "item"), "compose": "additive", "negatives": 256},
                         "6c8cdb135bbd3ba4e4f87f107a3d07b4c1c017fc292f0a94a310ecb54dc95171"),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_run_keys_of_earlier_configurations_are_unchanged(name):
    config, key = GOLDEN[name]
    assert stage_key("train", TrainParams(**config).as_dict(), {"windows": "w" * 64}) == key


@pytest.mark.parametrize("name", GOLDEN)
def test_every_golden_record_reads_back_with_its_key(name):
    """config.json's params (as `as_dict` wrote them) give back the parameters and the key."""
    config, key = GOLDEN[name]
    params = TrainParams(**config)
    back = TrainParams.from_record(json.loads(json.dumps(params.as_dict())))
    assert back == params  # under a full softmax the sampler's fields read back at their defaults
    assert stage_key("train", back.as_dict(), {"windows": "w" * 64}) == key


def test_a_historical_record_reads_back_with_its_key():
    """A run config written before the sampler options existed loads as what it was trained with."""
    config, key = GOLDEN["sampled256"]
    old = TrainParams(**config).as_dict()
    assert "negatives_per" not in old and "logq" not in old  # as the old code wrote it
    back = TrainParams.from_record(old)
    assert back.negatives_per == "batch" and back.logq is False
    assert stage_key("train", back.as_dict(), {"windows": "w" * 64}) == key


def test_new_fields_enter_the_key_only_when_used():
    legacy = TrainParams(negatives=256, negatives_per="batch", logq=False).as_dict()
    assert "negatives_per" not in legacy and "router" not in legacy and "router_weight" not in legacy
    default = TrainParams(negatives=256).as_dict()  # today's sampler: per position, logQ
    assert default["negatives_per"] == "position" and default["logq"] is True
    hllm_ft = TrainParams(backbone="hllm", negatives=256, train_item_llm=True)
    assert hllm_ft.negatives_per == "batch" and not hllm_ft.logq  # one shared draw is what it encodes
    routed = TrainParams(priors=("item",), router=True).as_dict()
    assert routed["router"] is True and routed["router_weight"] == 1.0
    # a full softmax ignores how negatives would be drawn
    full = TrainParams().as_dict()
    assert "negatives_per" not in full and "logq" not in full


def reference_router_loss(logits, targets, compat, gamma):
    B, L, tau = targets.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(L):
            p = torch.softmax(logits[b, t], dim=0)
            for j in range(tau):
                ks = [k for k in range(compat.shape[3]) if bool(compat[b, t, j, k])]
                if int(targets[b, t, j]) == 0 or not ks:
                    continue
                total = total - gamma**j * torch.log(sum(p[k] for k in ks))
                count += 1
    return total / count


def test_router_loss_equals_the_loop_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 6, (3, 5, 3), generator=g)
    compat = torch.rand(3, 5, 3, 4, generator=g) < 0.5
    fast = router_loss(logits, targets, compat, gamma=0.9)
    ref = reference_router_loss(logits, targets, compat, 0.9)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(torch.autograd.grad(fast, logits)[0], torch.autograd.grad(ref, logits)[0])


def partition(n_items=20, n_groups=4, seed=0):
    rng = np.random.default_rng(seed)
    group_of = rng.integers(0, n_groups, n_items)
    mat = np.zeros((n_groups, n_items + 1), dtype=bool)
    mat[group_of, np.arange(1, n_items + 1)] = True
    spec = PriorSpec(name="part", kind="item", key="k", group_names=tuple(f"g{i}" for i in range(n_groups)),
                     item_groups=mat, event_groups=None, horizon_groups=None, user_groups=None, params={})
    layout = build_layout((spec,), "flat")
    return Compatibility(layout, n_items).omega


def routed_setup(seed=0):
    omega = partition(seed=seed)
    g = torch.Generator().manual_seed(seed)
    K, n = omega.shape[0], omega.shape[1] - 1
    q = torch.randn(5, K, 6, generator=g)
    items = torch.randn(n + 1, 6, generator=g)
    router = HeadRouter(6, K)
    torch.nn.init.normal_(router.proj.weight, generator=g)
    log_p = torch.log_softmax(router(torch.randn(5, 6, generator=g)), dim=-1).detach()
    offset = router_offsets(log_p, head_log_normalisers(q, items, dot_scores, omega))
    return omega, q, items, log_p, offset


def test_routed_scores_are_a_distribution_over_the_catalogue_for_a_partition_prior():
    omega, q, items, log_p, offset = routed_setup()
    scores = torch.einsum("bkd,nd->bkn", q, items)
    fused, _ = fuse_dense(scores, omega, "max", offset=offset)
    total = fused[:, 1:].logsumexp(dim=1)  # item 0 (padding) is never a candidate
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)
    # and each item's score is exactly log p(k(i) | h) + log softmax_{Ω_k(i)} s
    k_of = omega.float().argmax(dim=0)
    for b in range(2):
        for i in range(1, omega.shape[1]):
            k = int(k_of[i])
            members = omega[k].nonzero().flatten()
            want = log_p[b, k] + scores[b, k, i] - scores[b, k, members].logsumexp(0)
            assert float(fused[b, i]) == pytest.approx(float(want), abs=1e-5)


def test_routed_topk_from_the_grouped_scorer_equals_the_dense_reference():
    omega, q, items, log_p, offset = routed_setup(seed=3)
    heads = torch.ones(q.shape[:2], dtype=torch.bool)
    exclude = torch.zeros(q.shape[0], omega.shape[1], dtype=torch.bool)
    exclude[:, [2, 5]] = True
    fast = grouped_fused_topk(q, items, dot_scores, omega, heads, exclude, 7, "max", offset=offset)
    dense = dense_fused_topk(q, items, dot_scores, omega, heads, exclude, 7, "max", offset=offset)
    for a, b in zip(fast, dense, strict=True):
        assert torch.equal(a, b) if a.dtype != torch.float32 else torch.allclose(a, b, atol=1e-5)
    # the dense formula written out: log p(k | h) + log-softmax within Ω_k, then max over k
    scores = torch.einsum("bkd,nd->bkn", q, items)
    within = scores.masked_fill(~omega, -math.inf)
    routed = log_p.unsqueeze(-1) + within - within.logsumexp(-1, keepdim=True)
    best = routed.max(dim=1).values.masked_fill(exclude, -math.inf)
    best[:, 0] = -math.inf
    assert torch.equal(best.topk(7, dim=1).indices.sort(dim=1).values, fast[0].sort(dim=1).values)


TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=4, patience=0, lr=3e-3,
            warmup_steps=2, max_steps=8)


@pytest.fixture(scope="module")
def routed_runs(tmp_path_factory, one_thread):
    ds = make_dataset(tmp_path_factory.mktemp("router") / "ws")
    build_windows(ds, context=12, horizon=4)
    train(ds, TrainParams(**TINY), name="base", show_progress=False)
    train(ds, TrainParams(priors=("temporal", "item"), router=True, **TINY), name="routed", show_progress=False)
    train(ds, TrainParams(priors=("temporal", "item"), **TINY), name="plain-heads", show_progress=False)
    return ds


def test_router_trains_jointly_and_ranks(routed_runs):
    run = load_run(routed_runs, "routed")
    assert run.model.router is not None and run.model.router.proj.weight.abs().sum() > 0  # it learned
    log = [ln for ln in (run.path / "log.jsonl").read_text().splitlines() if ln]
    assert len(log) == 8
    _, res, _ = evaluate(routed_runs, "routed", EvalParams(fusion="router", ks=(10,)))
    assert res["metrics"]["users"] > 0 and not res["oracle"]
    with pytest.raises(Exception, match="--router"):
        evaluate(routed_runs, "plain-heads", EvalParams(fusion="router", ks=(10,)))


def test_group_oracle_is_labelled_and_restricts_base_and_heads_alike(routed_runs):
    for name in ("base", "plain-heads"):
        _, plain, _ = evaluate(routed_runs, name, EvalParams(ks=(10,)))
        _, oracle, _ = evaluate(routed_runs, name, EvalParams(ks=(10,), oracle_group="item"))
        assert oracle["oracle"] and not plain["oracle"]
        assert oracle["params"]["oracle_group"] == "item" and "oracle_group" not in plain["params"]
        # inside the true group the first target competes with fewer items: never worse at h = 1
        assert oracle["metrics"]["recall@10/h1"] >= plain["metrics"]["recall@10/h1"]
    with pytest.raises(Exception, match="item or graph"):
        evaluate(routed_runs, "base", EvalParams(ks=(10,), oracle_group="temporal"))


def test_frontier_points_and_plot(routed_runs, tmp_path):
    from mhr.report import collect, frontier_points, plot_frontier

    for lam in (0.0, 0.5):
        for name in ("base", "plain-heads"):
            evaluate(routed_runs, name, EvalParams(ks=(10,), diversity=lam, entropy_prior="item"))
    groups = collect(routed_runs, ["base", "plain-heads"], "test", "max")
    curves = frontier_points(routed_runs, groups)
    assert set(curves) == {g.label for g in groups}
    for pts in curves.values():
        lams = [p[0] for p in pts]
        assert 0.0 in lams and 0.5 in lams
        plain, reranked = dict((p[0], p) for p in pts)[0.0], dict((p[0], p) for p in pts)[0.5]
        assert reranked[2] >= plain[2] - 1e-9  # re-ranking for diversity never lowers H@10 here
    assert plot_frontier(curves, tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size > 0


def test_recommend_router_explains_head_and_its_probability(routed_runs, cli):
    import json as _json

    out = cli("--dataset", "tiny", "recommend", "routed", "--user", "u3", "--top", "4", "--fusion", "router",
              "--explain", workspace=routed_runs.dir.parent)
    lines = [_json.loads(x) for x in out.stdout.splitlines() if x.strip()]
    assert len(lines) == 4
    for rec in lines:
        assert rec["head"] and 0.0 < rec["p_head"] <= 1.0
    assert "p(head | user)" in out.stderr
