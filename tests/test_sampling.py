"""Sampled softmax modes (mhr.training.sampling) against a slow loop reference written plainly here."""

from __future__ import annotations

import math

import pytest
import torch

import mhr.training.sampling as sampling_mod
from mhr.models.heads import Compatibility, Scorer, dot_scores
from mhr.training.loss import multihead_loss
from mhr.training.sampling import HeadSampler, InBatch, Sampling
from tests.helpers import weighted_head_means
from tests.test_heads import EVENT_VOCAB, N_ITEMS, TAU, layouts, make_layout, random_batch

D = 8


def setup(compose, names, global_head, seed=0):
    layout = make_layout(compose, names, global_head)
    compat = Compatibility(layout, N_ITEMS, EVENT_VOCAB, horizon=TAU)
    targets, events, users = random_batch(seed=seed, batch=3, length=4)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(*targets.shape[:2], layout.n_heads, D, generator=g).requires_grad_()
    item_vecs = torch.randn(N_ITEMS + 1, D, generator=g).requires_grad_()
    return compat, q, item_vecs, targets, compat.targets(targets, events, users)


def reference_loss(q, item_vecs, targets, compat, omega, sampling: Sampling, gen, gamma, head_weights):
    """Loop over heads, then (b, t, j): the head's draw for this positive's batch / sequence /
    position (made in the order the fast path makes them), its candidates with their corrections,
    accidental hits dropped; then Σ_j γ^j Σ_k w_k L_kj."""
    B, L, K, _ = q.shape
    sampler = HeadSampler(omega, sampling, gen)
    scorer = Scorer("cosine", init_temperature=0.2)
    qn, vn = scorer.prepare(q, item_vecs)
    flat_targets = [int(y) for y in targets.reshape(-1) if int(y) > 0]
    sums, counts = [0.0] * K, [0] * K
    for k in range(K):
        queries = sorted({(b, t) for b in range(B) for t in range(L) for j in range(targets.shape[2])
                          if int(targets[b, t, j]) > 0 and bool(compat[b, t, j, k])})
        if not queries:
            continue
        if sampling.per == "batch":
            draw = sampler.draw(k, 1)
            row = {bt: draw[0] for bt in queries}
        elif sampling.per == "sequence":
            seqs = sorted({b for b, _ in queries})
            draw = sampler.draw(k, len(seqs))
            row = {bt: draw[seqs.index(bt[0])] for bt in queries}
        else:
            draw = sampler.draw(k, len(queries))
            row = {bt: draw[i] for i, bt in enumerate(queries)}
        in_group = [i for i in range(1, N_ITEMS + 1) if bool(sampler.omega[k, i])]
        n_group, n_global = sampling.split()

        def uniform_copies(i, in_group=in_group, n_group=n_group, n_global=n_global):
            inside = i in in_group
            return (n_group / len(in_group) if inside and n_group else 0.0) + n_global / N_ITEMS

        batch_items = {}
        if sampling.in_batch:
            for i in flat_targets:
                if sampling.negatives_from == "global" or i in in_group:
                    batch_items[i] = batch_items.get(i, 0) + 1
        for b, t in queries:
            s = qn[b, t, k] @ vn.T  # [N+1]
            for j in range(targets.shape[2]):
                y = int(targets[b, t, j])
                if y == 0 or not bool(compat[b, t, j, k]):
                    continue
                terms = [s[y]]
                for i in row[(b, t)].tolist():
                    if i in (0, y):
                        continue
                    corr = -math.log(uniform_copies(i) + batch_items.get(i, 0)) if sampling.logq else 0.0
                    terms.append(s[i] + corr)
                for i, c in batch_items.items():
                    if i == y:
                        continue
                    corr = -math.log(uniform_copies(i) + c) if sampling.logq else 0.0
                    terms.append(s[i] + corr)
                ce = torch.logsumexp(torch.stack(terms), dim=0) - s[y]
                sums[k] = sums[k] + gamma**j * ce
                counts[k] += 1
    return weighted_head_means(sums, counts, head_weights)


MODES = [
    # (n, per, in_batch, logq, negatives_from, global_ratio)
    (5, "batch", False, True, "group", 0.0),
    (5, "sequence", False, False, "group", 0.0),
    (6, "position", False, False, "group", 0.0),
    (6, "position", False, True, "group", 0.5),
    (4, "position", True, True, "group", 0.0),
    (4, "sequence", True, False, "global", 0.0),
    (3, "batch", True, True, "group", 0.0),
]


def _fast(q, item_vecs, targets, ct, omega, m, seed, gamma, head_weights):
    scorer = Scorer("cosine", init_temperature=0.2)
    qn, vn = scorer.prepare(q, item_vecs)
    return multihead_loss(qn, vn, dot_scores, targets, ct, omega, gamma=gamma, head_weights=head_weights,
                          negatives=m[0], negatives_per=m[1], in_batch=m[2], logq=m[3], negatives_from=m[4],
                          global_ratio=m[5], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", ["dense-table", "gathered", "shared"])
@pytest.mark.parametrize("m", MODES, ids=lambda m: "-".join(str(x) for x in m))
@pytest.mark.parametrize("compose,names,global_head", layouts())
def test_sampling_modes_equal_the_loop_reference(monkeypatch, compose, names, global_head, m, path):
    if path != "dense-table":  # per-row draws gather vectors instead of scoring the table
        monkeypatch.setattr(sampling_mod, "DENSE_FACTOR", 0)
        # gathered: [rows, n, d], one draw per query; shared: each draw once, a batched matmul
        monkeypatch.setattr(sampling_mod, "SHARED_QUERIES", 1 if path == "shared" else 10**9)
    compat, q, item_vecs, targets, ct = setup(compose, names, global_head, seed=len(names))
    sampling = Sampling(m[0], m[1], m[2], m[3], m[4], m[5])
    for head_weights, gamma in (("frequency", 0.8), ("uniform", 1.0)):
        fast, stats = _fast(q, item_vecs, targets, ct, compat.omega, m, 7, gamma, head_weights)
        ref = reference_loss(q, item_vecs, targets, ct, compat.omega, sampling, torch.Generator().manual_seed(7),
                             gamma, head_weights)
        torch.testing.assert_close(fast, ref)
        for a, b in zip(torch.autograd.grad(fast, (q, item_vecs)), torch.autograd.grad(ref, (q, item_vecs)),
                        strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dense,shared", [(64, 4), (0, 10**9), (0, 1)], ids=["dense-table", "gathered", "shared"])
@pytest.mark.parametrize("m", MODES[:5], ids=lambda m: "-".join(str(x) for x in m))
def test_chunked_and_unchunked_sampled_losses_agree(monkeypatch, m, dense, shared):
    monkeypatch.setattr(sampling_mod, "DENSE_FACTOR", dense)
    monkeypatch.setattr(sampling_mod, "SHARED_QUERIES", shared)
    compat, q, item_vecs, targets, ct = setup("hierarchical", ["temporal", "item"], False, seed=3)
    whole, _ = _fast(q, item_vecs, targets, ct, compat.omega, m, 11, 0.9, "frequency")
    g_whole = torch.autograd.grad(whole, (q, item_vecs))
    monkeypatch.setattr(sampling_mod, "CHUNK_ELEMENTS", 8)  # a chunk of one or two queries
    chunked, _ = _fast(q, item_vecs, targets, ct, compat.omega, m, 11, 0.9, "frequency")
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(torch.autograd.grad(chunked, (q, item_vecs)), g_whole, strict=True):
        torch.testing.assert_close(a, b)


def test_logq_correction_by_hand():
    """One head over items {1..4}, one position with target 1; n = 2 uniform draws per position
    and the batch's targets {1, 1, 3} in-batch: E[copies] = 2/4 + count."""
    omega = torch.zeros(1, 5, dtype=torch.bool)
    omega[0, 1:] = True
    targets = torch.tensor([[[1], [1], [3]]])  # B = 1, L = 3, τ = 1
    ct = torch.ones(1, 3, 1, 1, dtype=torch.bool)
    vecs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 4, (3, 2), generator=gen) + 1  # what the sampler draws, rows = positions
    loss, _ = multihead_loss(q, vecs, dot_scores, targets, ct, omega, negatives=2, negatives_per="position",
                             in_batch=True, logq=True, generator=torch.Generator().manual_seed(0))
    counts = {1: 2, 3: 1}
    total = 0.0
    for t, y in enumerate([1, 1, 3]):
        s = [float(q[0, t, 0] @ vecs[i]) for i in range(5)]
        terms = [s[y]]
        terms += [s[i] - math.log(0.5 + counts.get(i, 0)) for i in draws[t].tolist() if i != y]
        terms += [s[i] - math.log(0.5 + c) for i, c in counts.items() if i != y]
        total += math.log(sum(math.exp(v) for v in terms)) - s[y]
    assert float(loss) == pytest.approx(total / 3, rel=1e-5)


def test_accidental_hits_are_never_negatives():
    """Every draw hits the target (a group of one item): the softmax is the target alone, ce = 0."""
    omega = torch.zeros(1, 4, dtype=torch.bool)
    omega[0, 2] = True
    targets = torch.tensor([[[2], [2]]])
    ct = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    q = torch.randn(1, 2, 1, 3)
    vecs = torch.randn(4, 3)
    for per in ("batch", "sequence", "position"):
        for in_batch in (False, True):
            loss, _ = multihead_loss(q, vecs, dot_scores, targets, ct, omega, negatives=16, negatives_per=per,
                                     in_batch=in_batch, logq=True, generator=torch.Generator().manual_seed(1))
            assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_legacy_configuration_is_the_original_sampler():
    compat, q, item_vecs, targets, ct = setup("additive", ["item", "temporal"], False)
    assert Sampling(8).is_legacy and not Sampling(8, per="position").is_legacy
    a, _ = multihead_loss(q, item_vecs, Scorer(), targets, ct, compat.omega, negatives=8,
                          generator=torch.Generator().manual_seed(0))
    b, _ = multihead_loss(q, item_vecs, Scorer(), targets, ct, compat.omega, negatives=8, negatives_per="batch",
                          in_batch=False, logq=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_in_batch_counts():
    ib = InBatch.of(torch.tensor([[[3, 0], [3, 5]], [[5, 5], [0, 0]]]))
    assert ib.ids.tolist() == [3, 5] and ib.counts.tolist() == [2.0, 3.0]


def test_draws_stay_in_the_group_and_are_deterministic():
    omega = torch.zeros(2, 10, dtype=torch.bool)
    omega[0, [2, 4, 6]] = True
    omega[1, [1, 9]] = True
    s = Sampling(50, per="position")
    a = HeadSampler(omega, s, torch.Generator().manual_seed(3)).draw(0, 7)
    b = HeadSampler(omega, s, torch.Generator().manual_seed(3)).draw(0, 7)
    assert a.shape == (7, 50) and torch.equal(a, b)
    assert set(a.unique().tolist()) == {2, 4, 6}
    assert set(HeadSampler(omega, s, torch.Generator().manual_seed(3)).draw(1, 2).unique().tolist()) == {1, 9}
