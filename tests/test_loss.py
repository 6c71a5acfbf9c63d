"""The multi-head loss against a slow loop-based reference written plainly here (paper Eq. 6–8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mhr.training.loss as loss_mod
from mhr.models.heads import Compatibility, PriorHeads, Scorer, build_layout
from mhr.priors.spec import PriorSpec
from mhr.training.loss import candidate_sets, multihead_loss, sample_negatives
from tests.helpers import weighted_head_means
from tests.test_heads import (
    EVENT_VOCAB,
    N_ITEMS,
    TAU,
    _items,
    layouts,
    make_layout,
    random_batch,
    tiny_priors,
)

D = 8


def reference_loss(q, item_vecs, scorer, targets, compat, gamma, head_weights, cand=None, negs=None):
    """Loop over (b, t, j, k): softmax over {target} ∪ cand[k] (full) or {target} ∪ the head's
    negatives negs[k] other than the target (sampled); then Σ_j γ^j Σ_k w_k L_kj."""
    B, L, K, _ = q.shape
    sums = [0.0] * K
    counts = [0] * K
    for b in range(B):
        for t in range(L):
            for j in range(targets.shape[2]):
                for k in range(K):
                    y = int(targets[b, t, j])
                    if y == 0 or not bool(compat[b, t, j, k]):
                        continue
                    s = scorer(q[b, t, k], item_vecs)  # [N+1]
                    if negs is None:
                        members = [i for i in range(1, item_vecs.shape[0]) if bool(cand[k, i]) or i == y]
                    else:
                        members = [y] + [n for n in negs[k].tolist() if n not in (y, 0)]
                    ce = torch.logsumexp(s[members], dim=0) - s[y]
                    sums[k] = sums[k] + gamma**j * ce
                    counts[k] += 1
    return weighted_head_means(sums, counts, head_weights)


def setup(compose, names, global_head, seed=0, score="cosine"):
    layout = make_layout(compose, names, global_head)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB, horizon=TAU)
    targets, events, users = random_batch(seed=seed, batch=2, length=4)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(*targets.shape[:2], layout.n_heads, D, generator=g).requires_grad_()
    item_vecs = torch.randn(N_ITEMS + 1, D, generator=g).requires_grad_()
    scorer = Scorer(score, init_temperature=0.2)
    return layout, compat, q, item_vecs, scorer, targets, compat.targets(targets, events, users)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


MODES = [
    # (negatives, negatives_from, global_ratio)
    (None, "group", 0.0),
    (None, "group", 0.4),
    (None, "global", 0.0),
    (5, "group", 0.0),
    (6, "group", 0.5),
    (4, "global", 0.0),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0] or 'full'}-{m[1]}-{m[2]}")
@pytest.mark.parametrize("compose,names,global_head", layouts())
def test_fast_loss_equals_reference(compose, names, global_head, mode):
    negatives, negatives_from, ratio = mode
    _, compat, q, item_vecs, scorer, targets, ct = setup(compose, names, global_head, seed=len(names))
    for head_weights, gamma in (("frequency", 0.8), ("uniform", 1.0)):
        fast, stats = multihead_loss(
            q, item_vecs, scorer, targets, ct, compat.omega, gamma=gamma, head_weights=head_weights,
            negatives=negatives, negatives_from=negatives_from, global_ratio=ratio,
            generator=torch.Generator().manual_seed(7),
        )
        # the same random draws, made explicitly
        gen = torch.Generator().manual_seed(7)
        if negatives is None:
            cand = candidate_sets(compat.omega, negatives_from, ratio, gen)
            ref = reference_loss(q, item_vecs, scorer, targets, ct, gamma, head_weights, cand=cand)
        else:
            negs = sample_negatives(compat.omega, negatives, negatives_from, ratio, gen)
            ref = reference_loss(q, item_vecs, scorer, targets, ct, gamma, head_weights, negs=negs)
        torch.testing.assert_close(fast, ref)
        for a, b in zip(grads(fast, q, item_vecs, scorer.log_scale), grads(ref, q, item_vecs, scorer.log_scale),
                        strict=True):
            torch.testing.assert_close(a, b)
        assert torch.equal(stats["positives"], ct.sum(dim=(0, 1, 2)))


def test_frequency_weights_make_the_mean_over_head_positive_pairs():
    _, compat, q, item_vecs, scorer, targets, ct = setup("additive", ["item", "temporal"], True)
    loss, stats = multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega, head_weights="frequency")
    counts = ct.sum(dim=(0, 1, 2))
    assert torch.equal(stats["positives"], counts)
    torch.testing.assert_close(stats["weights"], counts.float() / counts.sum())
    assert int(stats["n_positives"]) == int(counts.sum()) and int(stats["heads_used"]) == int((counts > 0).sum())
    # every (head, positive) pair counts once: the loss is the mean of the per-head means weighted by counts
    torch.testing.assert_close(loss, (stats["head_loss"] * counts).sum() / counts.sum())
    uniform, ustats = multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega, head_weights="uniform")
    torch.testing.assert_close(uniform, ustats["head_loss"][counts > 0].mean())


def test_heads_without_positives_are_skipped():
    layout = make_layout("additive", ["item", "temporal"])
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    heads, scorer = PriorHeads(D, layout), Scorer()
    targets = torch.tensor([[[1, 2, 0, 3], [2, 0, 0, 0]]])  # only Action items: Comedy, Drama have none
    users = torch.tensor([1])
    ct = compat.targets(targets, torch.zeros_like(targets), users)
    h = torch.randn(1, 2, D, requires_grad=True)
    item_vecs = torch.randn(N_ITEMS + 1, D, requires_grad=True)
    for negatives in (None, 3):
        heads.zero_grad()
        loss, stats = multihead_loss(heads(h), item_vecs, scorer, targets, ct, compat.omega, negatives=negatives,
                                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)
        loss.backward()
        assert stats["positives"].tolist() == [4, 0, 0, 3, 1]
        assert stats["head_loss"][1:3].eq(0).all()
        for k in (1, 2):  # Comedy and Drama adapters get exactly zero gradient
            assert heads.weight.grad[k].eq(0).all() and heads.bias.grad[k].eq(0).all()
        for k in (0, 3, 4):
            assert heads.weight.grad[k].abs().sum() > 0
        assert all(torch.isfinite(p.grad).all() for p in heads.parameters())


def test_a_batch_without_any_positive():
    layout = make_layout("flat", ["item"])
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    heads, scorer = PriorHeads(D, layout), Scorer()
    targets = torch.zeros(2, 3, TAU, dtype=torch.long)
    ct = compat.targets(targets, torch.zeros_like(targets), torch.tensor([1, 2]))
    for negatives in (None, 4):
        loss, stats = multihead_loss(heads(torch.randn(2, 3, D)), torch.randn(N_ITEMS + 1, D, requires_grad=True),
                                     scorer, targets, ct, compat.omega, negatives=negatives)
        assert loss.item() == 0.0 and int(stats["heads_used"]) == 0
        loss.backward()
        assert heads.weight.grad.eq(0).all() and scorer.log_scale.grad == 0


@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_one_head_without_priors_is_the_plain_next_item_loss(score):
    layout = build_layout([], "hierarchical")
    compat = Compatibility(layout, N_ITEMS)
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(1, N_ITEMS + 1, (4, 6, 1), generator=g)
    targets[0, 4:] = 0  # padding
    q = torch.randn(4, 6, 1, D, generator=g)
    item_vecs = torch.randn(N_ITEMS + 1, D, generator=g)
    scorer = Scorer(score)
    ct = compat.targets(targets, None, torch.ones(4, dtype=torch.long))
    loss, _ = multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega, gamma=0.5)
    logits = scorer(q[:, :, 0], item_vecs)[..., 1:]  # item 0 is never a candidate
    real = targets[..., 0] > 0
    plain = F.cross_entropy(logits[real], targets[..., 0][real] - 1)
    torch.testing.assert_close(loss, plain)
    # τ > 1: each position's next τ items, discounted by γ^j, averaged over all targets
    targets4 = torch.randint(0, N_ITEMS + 1, (4, 6, 3), generator=g)
    ct4 = compat.targets(targets4, None, torch.ones(4, dtype=torch.long))
    loss4, _ = multihead_loss(q, item_vecs, scorer, targets4, ct4, compat.omega, gamma=0.5)
    full = scorer(q[:, :, 0], item_vecs)[..., 1:]
    ce = -full.log_softmax(-1).gather(-1, (targets4 - 1).clamp(min=0))  # [4, 6, 3]
    weight = (targets4 > 0) * 0.5 ** torch.arange(3)
    torch.testing.assert_close(loss4, (ce * weight).sum() / (targets4 > 0).sum())


def test_items_outside_every_positive_heads_set_get_no_gradient():
    layout = make_layout("flat", ["item"])
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    targets = torch.tensor([[[1, 2], [3, 5]]])  # Action items (4, 5 also Comedy): Drama-only items untouched
    ct = compat.targets(targets, None, torch.tensor([1]))
    q = torch.randn(1, 2, 3, D)
    item_vecs = torch.randn(N_ITEMS + 1, D, requires_grad=True)
    loss, _ = multihead_loss(q, item_vecs, Scorer(), targets, ct, compat.omega)
    (grad,) = grads(loss, item_vecs)
    assert grad[9:].eq(0).all() and grad[0].eq(0).all() and grad[1:9].abs().sum(1).gt(0).all()
    loss, _ = multihead_loss(q, item_vecs, Scorer(), targets, ct, compat.omega, negatives_from="global")
    (grad,) = grads(loss, item_vecs)
    assert grad[1:].abs().sum(1).gt(0).all() and grad[0].eq(0).all()


def test_a_negative_equal_to_the_positive_is_masked():
    single = PriorSpec("item", "item", "k", ("one", "rest"), {}, item_groups=_items([{3}, set(range(1, 13))]))
    layout = build_layout([single], "flat")
    compat = Compatibility(layout, N_ITEMS)
    targets = torch.tensor([[[3]]])
    ct = compat.targets(targets, None, torch.tensor([1]))
    ct[..., 1] = False  # only the single-item head
    q, item_vecs = torch.randn(1, 1, 2, D), torch.randn(N_ITEMS + 1, D)
    q.requires_grad_()
    for negatives in (None, 8):
        loss, _ = multihead_loss(q, item_vecs, Scorer(), targets, ct, compat.omega, negatives=negatives)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the softmax holds the target alone
        assert torch.isfinite(grads(loss, q)[0]).all()


def test_sampled_negatives_come_from_the_right_pools():
    layout = build_layout([tiny_priors()["item"], tiny_priors()["graph"]], "multiplicative", True, drop_empty=False)
    omega = Compatibility(layout, N_ITEMS).omega  # two empty leaves: "Action · c1", "Drama · c0"
    negs = sample_negatives(omega, 400, "group", 0.25, torch.Generator().manual_seed(0))
    assert negs.shape == (layout.n_heads, 400)
    group, glob = negs[:, :300], negs[:, 300:]
    for k in range(layout.n_heads):  # uniform over Ω_k: every member drawn, nothing else
        assert set(group[k].tolist()) == (set(torch.nonzero(omega[k]).flatten().tolist()) or {0})
        assert set(glob[k].tolist()) == set(range(1, N_ITEMS + 1))
    everything = sample_negatives(omega, 60, "global", 0.0, torch.Generator().manual_seed(1))
    assert everything.min() >= 1 and everything.max() <= N_ITEMS
    assert (~omega.gather(1, everything)).any()  # global draws ignore Ω_k


def test_global_ratio_with_full_softmax_interpolates():
    omega = Compatibility(make_layout("flat", ["item"]), N_ITEMS).omega
    none = candidate_sets(omega, "group", 0.0)
    assert torch.equal(none, omega)
    every = candidate_sets(omega, "group", 1.0, torch.Generator().manual_seed(0))
    assert every[:, 1:].all() and not every[:, 0].any()
    some = candidate_sets(omega, "group", 0.5, torch.Generator().manual_seed(0))
    assert (some >= omega).all() and some.sum() > omega.sum() and some.sum() < every.sum()


@pytest.mark.parametrize("negatives", [None, 3])
def test_chunked_equals_unchunked(monkeypatch, negatives):
    _, compat, q, item_vecs, scorer, targets, ct = setup("hierarchical", ["temporal", "item"], True, seed=2)
    kwargs = dict(gamma=0.9, negatives=negatives, global_ratio=0.3)
    whole, _ = multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega, **kwargs,
                              generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 40)
    chunked, _ = multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega, **kwargs,
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(grads(chunked, q, item_vecs, scorer.log_scale), grads(whole, q, item_vecs, scorer.log_scale),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_flow_end_to_end():
    layout = make_layout("hierarchical", ["item", "temporal"], True)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB)
    heads, scorer = PriorHeads(D, layout), Scorer()
    targets, events, users = random_batch()
    h = torch.randn(*targets.shape[:2], D, requires_grad=True)
    item_vecs = torch.randn(N_ITEMS + 1, D, requires_grad=True)
    loss, _ = multihead_loss(heads(h), item_vecs, scorer, targets, compat.targets(targets, events, users),
                             compat.omega, gamma=0.9, negatives=4, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item())
    for t in [h, item_vecs, scorer.log_scale, *heads.parameters()]:
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_determinism():
    _, compat, q, item_vecs, scorer, targets, ct = setup("multiplicative", ["temporal", "item"], False)

    def run(seed, **kw):
        return multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega,
                              generator=torch.Generator().manual_seed(seed), **kw)[0]

    assert torch.equal(run(0, negatives=5, global_ratio=0.4), run(0, negatives=5, global_ratio=0.4))
    assert not torch.equal(run(0, negatives=5), run(1, negatives=5))
    assert torch.equal(run(0, global_ratio=0.5), run(0, global_ratio=0.5))
    assert torch.equal(run(0), run(1))  # full in-group softmax draws nothing


def test_bad_arguments():
    _, compat, q, item_vecs, scorer, targets, ct = setup("flat", ["item"], False)
    for kw in (dict(head_weights="equal"), dict(negatives_from="batch"), dict(global_ratio=1.5), dict(negatives=0)):
        with pytest.raises(ValueError):
            multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega, **kw)
    with pytest.raises(ValueError):
        multihead_loss(q, item_vecs, scorer, targets, ct, compat.omega[:, :-1])


def test_dot_scores_fast_target_path_equals_the_generic_scorer():
    """`mhr.models.heads.dot_scores` takes an elementwise path for the targets' own scores; any other
    scorer goes through the generic [P, 1, d] call. Same loss, same gradients."""
    from mhr.models.heads import dot_scores
    from tests.helpers import dot

    torch.manual_seed(7)
    q = torch.randn(2, 4, 3, 6, requires_grad=True)
    vecs = torch.randn(20, 6, requires_grad=True)
    targets = torch.randint(0, 20, (2, 4, 3))
    compat = torch.rand(2, 4, 3, 3) < 0.6
    omega = torch.rand(3, 20) < 0.7
    out = []
    for scorer in (dot, dot_scores):
        for negatives in (None, 5):
            q.grad = vecs.grad = None
            loss, _ = multihead_loss(q, vecs, scorer, targets, compat, omega, negatives=negatives,
                                     global_ratio=0.3, generator=torch.Generator().manual_seed(0))
            loss.backward()
            out.append((loss.detach(), q.grad.clone(), vecs.grad.clone()))
    for a, b in zip(out[:2], out[2:], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
