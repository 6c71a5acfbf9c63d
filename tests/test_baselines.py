"""Baselines on the shared backbone and loss: ComiRec-SA, REMI, random/all head assignments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mhr.errors import UsageError
from mhr.models.comirec import ComiRecSA, hard_readout, routing_regulariser
from mhr.models.heads import Compatibility
from mhr.models.multihead import DecoderOptions, backbone_config, build_model, interest_layout
from mhr.priors.synthetic import synthetic_prior
from mhr.ranking.evaluate import EvalParams, evaluate
from mhr.ranking.inference import rank_split
from mhr.training.loss import Positives, loss_from_negatives, multihead_loss
from mhr.training.params import TrainParams, default_run_name
from mhr.training.runs import load_run
from mhr.training.train import train
from mhr.windows import build_windows, load_windows
from tests.helpers import dot, interrupt_at_batch, make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=3, patience=0, lr=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ds = make_dataset(tmp_path_factory.mktemp("baselines") / "ws")
    build_windows(ds, context=12, horizon=4)
    return ds


# ------------------------------------------------------------------------------------- ComiRec-SA


def test_comirec_shapes_and_causality(one_thread):
    torch.manual_seed(0)
    dec = ComiRecSA(d=8, interests=3)
    h = torch.randn(2, 6, 8)
    q = dec(h)
    assert q.shape == (2, 6, 3, 8)
    h2 = h.clone()
    h2[:, 4:] += torch.randn(2, 2, 8)  # change the future of position 3
    q2 = dec(h2)
    assert torch.allclose(q[:, :4], q2[:, :4], atol=1e-6)
    assert not torch.allclose(q[:, 4:], q2[:, 4:])
    # position 0 sees only itself: every interest is h_0
    assert torch.allclose(q[:, 0], h[:, :1].expand(-1, 3, -1), atol=1e-6)


def test_comirec_attention_matches_loop_reference(one_thread):
    torch.manual_seed(1)
    dec = ComiRecSA(d=5, interests=2)
    h = torch.randn(1, 4, 5)
    q = dec(h)
    a = dec.w2(torch.tanh(dec.w1(h)))[0]  # [L, K]
    for t in range(4):
        for k in range(2):
            w = torch.softmax(a[: t + 1, k], dim=0)
            ref = (w.unsqueeze(1) * h[0, : t + 1]).sum(0)
            assert torch.allclose(q[0, t, k], ref, atol=1e-5)


def test_routing_regulariser_matches_slow_reference(one_thread):
    torch.manual_seed(2)
    dec = ComiRecSA(d=6, interests=3)
    h = torch.randn(2, 5, 6)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    attn = dec.attention(h)
    fast = routing_regulariser(attn, d=6, valid=valid)
    total = 0.0
    for b in range(2):
        per_pos = []
        for t in range(5):
            if not valid[b, t]:
                continue
            A = attn[b, t, : t + 1].t()  # [K, t+1]
            C = (A - A.mean(dim=1, keepdim=True)) @ (A - A.mean(dim=1, keepdim=True)).t() / 6
            per_pos.append(float(torch.diagonal(C).detach().norm() ** 2))
        total += sum(per_pos) / len(per_pos)
    assert math.isclose(float(fast.detach()), total, rel_tol=1e-5)
    # REMI's λ scales it and it only appears in training mode
    remi = ComiRecSA(d=6, interests=3, routing_reg=100.0)
    remi.load_state_dict(dec.state_dict())
    _, aux = remi.decode(h, valid)
    assert math.isclose(float(aux["routing"].detach()), 100 * total, rel_tol=1e-5)
    remi.eval()
    assert remi.decode(h, valid)[1] == {}


def test_hard_readout_picks_best_interest_per_target(one_thread):
    torch.manual_seed(3)
    q = torch.randn(2, 3, 4, 8)
    items = torch.randn(11, 8)
    targets = torch.randint(1, 11, (2, 3, 2))
    compat = torch.ones(2, 3, 2, 4, dtype=torch.bool)
    sel = hard_readout(q, items, dot, targets, compat)
    assert sel.shape == compat.shape and (sel.sum(-1) == 1).all()
    for b in range(2):
        for t in range(3):
            for j in range(2):
                best = int(torch.argmax(q[b, t] @ items[targets[b, t, j]]))
                assert sel[b, t, j, best]


def test_one_interest_comirec_is_single_vector_scoring(one_thread, tiny):
    """K = 1: the loss is the plain softmax loss of that one vector, and ranking is the plain
    scorer's top-k of it (history excluded)."""
    wref_split = load_windows(tiny).read_split("valid")
    n_items = 30
    torch.manual_seed(4)
    config = backbone_config("hstu", "tiny", n_items, 12)
    model = build_model("hstu", config, interest_layout(1, n_items), "cosine", 0.05, DecoderOptions("comirec", 1))
    model.eval()
    compat = Compatibility(interest_layout(1, n_items), n_items)
    ranking = rank_split(model, compat, wref_split, k=5, fusion="max")
    items = torch.from_numpy(wref_split["items"])
    q = model.last_queries(items, torch.from_numpy(wref_split["ts"]), torch.from_numpy(wref_split["length"]))
    scores = model.scorer(q[:, 0], model.item_vectors())  # [U, N+1]
    scores[:, 0] = -math.inf
    for u in range(len(items)):
        hist = wref_split["history_items"][wref_split["history_ptr"][u] : wref_split["history_ptr"][u + 1]]
        scores[u, hist] = -math.inf
    top = scores.topk(5, dim=1).indices.numpy()
    assert np.array_equal(np.sort(top, axis=1), np.sort(ranking.items, axis=1))
    assert (ranking.winners == 0).all()
    # loss: one head over every item == the global softmax cross-entropy of that vector
    targets = torch.tensor([[[3, 0]], [[7, 9]]])  # [B=2, L=1, τ=2]
    qq = torch.randn(2, 1, 1, 8)
    vecs = torch.randn(n_items + 1, 8)
    compat_t = hard_readout(qq, vecs, dot, targets, (targets > 0).unsqueeze(-1))
    loss, _ = multihead_loss(qq, vecs, dot, targets, compat_t, compat.omega, gamma=1.0)
    logits = qq[:, 0, 0] @ vecs[1:].t()
    ref = [torch.logsumexp(logits[b], 0) - logits[b, y - 1] for b, y in ((0, 3), (1, 7), (1, 9))]
    assert torch.allclose(loss, torch.stack(ref).mean(), atol=1e-5)


# ------------------------------------------------------------------------------------- REMI: IHN


def _ihn_reference(q, vecs, pos: Positives, negs, beta):
    """Per positive: −log e^{s+} / (e^{s+} + Σ_i w_i e^{s_i}), w_i = e^{β s_i} / mean_j e^{β s_j}
    over the kept negatives (not the target, not 0); mean over positives (one head, γ = 1)."""
    out = []
    for p in range(len(pos)):
        qv = q[pos.b[p], pos.t[p], pos.k[p]]
        y = int(pos.item[p])
        s_pos = float(qv @ vecs[y])
        kept = [int(i) for i in negs[pos.k[p]] if int(i) != y and int(i) != 0]
        s = [float(qv @ vecs[i]) for i in kept]
        mean_w = sum(math.exp(beta * x) for x in s) / len(s)
        denom = math.exp(s_pos) + sum(math.exp(beta * x) / mean_w * math.exp(x) for x in s)
        out.append(-(s_pos - math.log(denom)))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.0, 0.7, 3.0])
def test_hard_negative_loss_matches_slow_reference(beta, one_thread):
    torch.manual_seed(5)
    q = torch.randn(2, 3, 1, 6)
    vecs = torch.randn(12, 6)
    pos = Positives(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 0, 1]),
                    torch.tensor([0, 0, 0, 0]), torch.tensor([4, 5, 6, 4]))
    negs = torch.tensor([[4, 1, 2, 9, 0, 11, 2]])  # holds a target (4) and padding (0): both masked
    loss, _ = loss_from_negatives(q, vecs, dot, pos, negs, gamma=1.0, beta=beta)
    assert math.isclose(float(loss), _ihn_reference(q, vecs, pos, negs, beta), rel_tol=1e-5)


def test_beta_zero_is_plain_sampled_softmax_and_beta_needs_negatives(one_thread):
    torch.manual_seed(6)
    q = torch.randn(2, 3, 2, 6)
    vecs = torch.randn(15, 6)
    targets = torch.randint(0, 15, (2, 3, 2))
    compat = torch.ones(2, 3, 2, 2, dtype=torch.bool)
    omega = torch.ones(2, 15, dtype=torch.bool)
    plain = multihead_loss(q, vecs, dot, targets, compat, omega, negatives=7,
                           generator=torch.Generator().manual_seed(0))[0]
    zero = multihead_loss(q, vecs, dot, targets, compat, omega, negatives=7, hard_negative_beta=0.0,
                          generator=torch.Generator().manual_seed(0))[0]
    tilted = multihead_loss(q, vecs, dot, targets, compat, omega, negatives=7, hard_negative_beta=2.0,
                            generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(plain, zero) and not torch.allclose(plain, tilted)
    with pytest.raises(ValueError, match="needs negatives"):
        multihead_loss(q, vecs, dot, targets, compat, omega, hard_negative_beta=1.0)


# ----------------------------------------------------------------------- random:K / all:K priors


def test_synthetic_priors():
    r = synthetic_prior("random:4", 50, seed=0)
    assert r.item_groups.shape == (4, 51) and not r.item_groups[:, 0].any()
    assert (r.item_groups[:, 1:].sum(0) == 1).all()  # every item in exactly one group
    assert np.array_equal(r.item_groups, synthetic_prior("random:4", 50, seed=0).item_groups)
    assert not np.array_equal(r.item_groups, synthetic_prior("random:4", 50, seed=1).item_groups)
    a = synthetic_prior("all:3", 50)
    assert a.item_groups[:, 1:].all() and a.n_groups == 3 and a.restricts_items
    with pytest.raises(UsageError):
        synthetic_prior("random:0", 50)
    with pytest.raises(UsageError):
        synthetic_prior("genre:3", 50)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize(
    "params",
    [
        dict(decoder="comirec", interests=3),
        dict(decoder="remi", interests=3, negatives=8, beta=1.0),
        dict(priors=("random:3",)),
        dict(priors=("all:3",)),
    ],
    ids=["comirec", "remi", "random", "all"],
)
def test_baselines_train_reload_and_evaluate(params, tiny, one_thread):
    p = TrainParams(max_steps=4, **TINY, **params)
    name = default_run_name(p)
    r = train(tiny, p, name=name, show_progress=False)
    assert np.isfinite(r.best["valid_ndcg@10"])
    run = load_run(tiny, name)
    assert run.layout.n_heads == 3
    out, result, _ = evaluate(tiny, name, EvalParams(split="valid", ks=(5, 10)))
    assert out.is_file() and 0.0 <= result["metrics"]["ndcg@10/h4"] <= 1.0
    if p.decoder != "heads":
        assert run.layout.names == ("interest 1", "interest 2", "interest 3")
        assert isinstance(run.model.heads, ComiRecSA)
    if p.decoder == "remi":
        assert run.model.heads.routing_reg == 100.0  # REMI's default λ


def test_baseline_options_are_checked(tiny):
    with pytest.raises(UsageError, match="takes no --priors"):
        train(tiny, TrainParams(decoder="comirec", priors=("item",), **TINY), show_progress=False)
    with pytest.raises(UsageError, match="needs|--negatives"):
        train(tiny, TrainParams(decoder="remi", beta=1.0, **TINY), show_progress=False)
    with pytest.raises(UsageError, match="unknown --decoder"):
        train(tiny, TrainParams(decoder="mind", **TINY), show_progress=False)
    # the prior heads' run key does not change with baseline-only settings
    assert TrainParams(interests=9).as_dict() == TrainParams().as_dict()
    # default names are valid run names, with several priors and synthetic ones too
    from mhr.workspace import check_name

    for priors in (("temporal", "item"), ("random:8",), ("all:4", "temporal")):
        check_name(default_run_name(TrainParams(priors=priors)), "run")


def test_recipe_grid_selects_on_validation_and_references(tmp_path, one_thread):
    import json

    from mhr.recipe import run_recipe
    from mhr.workspace import Workspace

    ws = tmp_path / "ws"
    make_dataset(ws, name="tiny")
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[recipe]
name = "g"
dataset = "tiny"
seeds = [0, 1]
[windows]
context = 12
horizon = 4
[train]
size = "tiny"
max_steps = 3
batch_size = 16
negatives = 8
[variants.comirec]
decoder = "comirec"
[variants.comirec.grid]
interests = [1, 2]
[variants.remi]
decoder = "remi"
interests = "@comirec"
[variants.remi.grid]
beta = [0.5]
[eval]
split = "valid"
k = [10]
""")
    first = run_recipe(recipe, Workspace(ws))
    sel = json.loads((ws / "tiny" / "reports" / "g" / "selection.json").read_text())
    points = sel["comirec"]["points"]
    best = max(points, key=lambda p: p["valid_ndcg@10"])["settings"]["interests"]
    assert sel["comirec"]["selected"] == {"interests": best}
    assert first.runs == [f"g-comirec-interests{best}-s0", f"g-comirec-interests{best}-s1",
                          "g-remi-beta0.5-s0", "g-remi-beta0.5-s1"]
    remi = json.loads((ws / "tiny" / "runs" / "g-remi-beta0.5-s1" / "config.json").read_text())
    assert remi["params"]["interests"] == best and remi["params"]["beta"] == 0.5
    stamps = {p: p.stat().st_mtime_ns for p in (ws / "tiny" / "runs").rglob("*") if p.is_file()}
    assert run_recipe(recipe, Workspace(ws)).runs == first.runs
    assert stamps == {p: p.stat().st_mtime_ns for p in (ws / "tiny" / "runs").rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------- diversity


def _greedy_reference(items, scores, groups, k, lam):
    chosen: list[int] = []
    for _ in range(k):
        best, best_gain = None, -math.inf
        for m in range(len(items)):
            if m in chosen:
                continue
            gi = set(np.flatnonzero(groups[:, items[m]]))
            bonus = sum(1 for j in chosen if not gi & set(np.flatnonzero(groups[:, items[j]])))
            gain = scores[m] + lam * bonus
            if gain > best_gain:
                best, best_gain = m, gain
        chosen.append(best)
    return chosen


def test_greedy_diversity_matches_reference_and_lambda_zero_is_plain():
    from mhr.ranking.diversity import greedy_diverse

    rng = np.random.default_rng(0)
    groups = rng.random((4, 31)) < 0.35
    groups[:, 0] = False
    items = np.stack([rng.permutation(np.arange(1, 31))[:12] for _ in range(5)])
    scores = -np.sort(-rng.random((5, 12)), axis=1)  # candidates arrive ranked
    for lam in (0.0, 0.3, 2.0):
        got = greedy_diverse(items, scores, groups, 6, lam)
        for u in range(5):
            assert list(got[u]) == _greedy_reference(items[u], scores[u], groups, 6, lam)
    assert (greedy_diverse(items, scores, groups, 6, 0.0) == np.arange(6)).all()


def test_eval_diversity_raises_category_entropy(tiny, one_thread):
    p = TrainParams(max_steps=4, **TINY, priors=("item",))
    train(tiny, p, name="div", show_progress=False)
    _, plain, _ = evaluate(tiny, "div", EvalParams(split="valid", ks=(10,)))
    _, diverse, _ = evaluate(tiny, "div", EvalParams(split="valid", ks=(10,), diversity=5.0))
    assert diverse["entropy"]["H@10"] >= plain["entropy"]["H@10"]
    assert diverse["params"]["diversity"] == 5.0 and "diversity" not in plain["params"]
    with pytest.raises(UsageError, match="diversity"):
        EvalParams(diversity=-1).check()


def test_interrupted_recipe_continues_where_it_stopped(tmp_path, monkeypatch, one_thread):
    import json

    from mhr.recipe import run_recipe
    from mhr.workspace import Workspace

    ws = tmp_path / "ws"
    make_dataset(ws, name="tiny")
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[recipe]
name = "c"
dataset = "tiny"
seeds = [0]
[windows]
context = 12
horizon = 4
[train]
size = "tiny"
max_steps = 6
eval_every = 2
batch_size = 16
[variants.base]
priors = []
[eval]
split = "valid"
k = [10]
""")
    # killed during step 4, after the step-2 checkpoint
    interrupt_at_batch(monkeypatch, 4, lambda: run_recipe(recipe, Workspace(ws)))
    result = run_recipe(recipe, Workspace(ws))
    log = [json.loads(x)["step"] for x in (ws / "tiny" / "runs" / "c-base-s0" / "log.jsonl").read_text().splitlines()]
    assert result.runs == ["c-base-s0"] and log == list(range(1, 7))
