"""Backbones: shapes, causality, padding, the time bias, determinism, sizes and estimates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mhr.errors import UsageError
from mhr.models import hstu, sasrec

N_ITEMS, MAX_LEN = 50, 12


def build(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "hstu":
        model = hstu.HSTU(hstu.hstu_config("tiny", N_ITEMS, MAX_LEN, **overrides))
    else:
        model = sasrec.SASRec(sasrec.sasrec_config("tiny", N_ITEMS, MAX_LEN, **overrides))
    return model.eval()


def batch(b: int = 3, seq: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (b, seq), generator=g)
    gaps = torch.randint(0, 10**6, (b, seq), generator=g)
    ts = 1_600_000_000 + gaps.cumsum(1)
    return items, ts


KINDS = ["hstu", "sasrec"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_item_vectors(kind):
    model = build(kind)
    items, ts = batch()
    h = model(items, ts)
    assert h.shape == (3, 10, 32) and torch.isfinite(h).all()
    vecs = model.item_vectors()
    assert vecs.shape == (N_ITEMS + 1, 32)
    assert torch.all(vecs[0] == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0, 3, 8])
def test_causal_in_items_and_timestamps(kind, t):
    model = build(kind)
    items, ts = batch()
    h = model(items, ts)
    items2, ts2 = items.clone(), ts.clone()
    items2[:, t + 1 :] = (items2[:, t + 1 :] % N_ITEMS) + 1
    ts2[:, t + 1 :] += 12345678
    h2 = model(items2, ts2)
    torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(h2[:, t + 1 :], h[:, t + 1 :], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_right_padding_changes_nothing(kind):
    model = build(kind)
    items, ts = batch(seq=7)
    h = model(items, ts)
    padded = torch.cat([items, torch.zeros(3, 5, dtype=torch.long)], 1)
    padded_ts = torch.cat([ts, torch.zeros(3, 5, dtype=torch.long)], 1)
    hp = model(padded, padded_ts)
    assert torch.isfinite(hp).all()
    torch.testing.assert_close(hp[:, :7], h, rtol=0, atol=1e-5)
    # ragged batch: a shorter sequence padded inside a batch equals it run alone
    ragged = items.clone()
    ragged[0, 4:] = 0
    torch.testing.assert_close(
        model(ragged, ts)[0, :4], model(items[:1, :4], ts[:1, :4])[0], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_all_padding_row_is_finite(kind):
    model = build(kind)
    items, ts = batch()
    items[1] = 0
    assert torch.isfinite(model(items, ts)).all()


def test_hstu_time_bias_is_used():
    items, ts = batch()
    shifted = ts.clone()
    shifted[:, :5] -= 10**7  # earlier events happened much earlier
    model = build("hstu")
    h, h2 = model(items, ts), model(items, shifted)
    assert (h2[:, 5:] - h[:, 5:]).abs().max() > 1e-4
    no_time = build("hstu", time_bias=False)
    torch.testing.assert_close(no_time(items, shifted), no_time(items, ts), rtol=0, atol=0)
    # a uniform shift of every timestamp changes no gap, hence no state
    torch.testing.assert_close(model(items, ts + 777), h, rtol=0, atol=0)


def test_hstu_position_bias_switch():
    assert hstu.estimate_params(
        hstu.hstu_config("tiny", N_ITEMS, MAX_LEN, position_bias=False)
    ) < hstu.estimate_params(hstu.hstu_config("tiny", N_ITEMS, MAX_LEN))
    items, ts = batch()
    assert torch.isfinite(build("hstu", position_bias=False, time_bias=False)(items, ts)).all()


@pytest.mark.parametrize("bucketing", hstu.TIME_BUCKETINGS)
def test_time_buckets_monotone_and_bounded(bucketing):
    dt = torch.tensor([0, 1, 2, 10, 60, 3600, 86400, 10**7, 10**12])
    b = hstu.bucketize_time(dt, bucketing, 64)
    assert b.min() >= 0 and b.max() <= 63
    assert torch.all(b[1:] >= b[:-1])
    assert torch.equal(hstu.bucketize_time(-dt, bucketing, 64), b)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_under_seed(kind):
    items, ts = batch()
    a, b = build(kind, seed=3), build(kind, seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a(items, ts), b(items, ts))
    assert not torch.equal(build(kind, seed=4)(items, ts), a(items, ts))
    a.train(), b.train()
    torch.manual_seed(9)
    ya = a(items, ts)
    torch.manual_seed(9)
    assert torch.equal(ya, b(items, ts))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(kind):
    model = build(kind).train()
    items, ts = batch()
    items[0, 6:] = 0
    h = model(items, ts)
    (h * torch.randn_like(h)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.all(model.item_vectors().grad[0] == 0)  # padding row stays fixed


@pytest.mark.parametrize(("module", "make"), [(hstu, hstu.hstu_config), (sasrec, sasrec.sasrec_config)])
def test_estimate_params_is_exact(module, make):
    for size in module.SIZES:
        if size in ("3", "4", "1b"):
            continue  # large: checked against the formula's growth below, not built
        config = make(size, 100, 20)
        model = (hstu.HSTU if module is hstu else sasrec.SASRec)(config)
        assert module.estimate_params(config) == sum(p.numel() for p in model.parameters()), size


def test_hstu_paper_sizes():
    # Without item embeddings an HSTU layer holds about 5 d^2 weights (uvqk 4 d^2, output d^2).
    def body(size: str) -> int:
        c = hstu.hstu_config(size, 1, 50)
        return hstu.estimate_params(c) - (c.n_items + 1) * c.d

    assert 0.30e6 < body("1") < 0.36e6
    assert 2.5e6 < body("2") < 2.8e6
    assert 15e6 < body("3") < 17e6
    assert 440e6 < body("1b") < 480e6
    c = hstu.hstu_config("1b", 1000, 50)
    assert (c.n_layers, c.n_heads, c.d, c.dropout, c.attn_dim, c.linear_dim) == (22, 32, 2048, 0.4, 64, 64)


@pytest.mark.parametrize(
    ("module", "make", "order"),
    [
        (hstu, hstu.hstu_config, ["tiny", "1", "2", "3", "4", "1b"]),
        (sasrec, sasrec.sasrec_config, ["tiny", "1", "2"]),
    ],
)
def test_estimates_monotone(module, make, order):
    configs = [make(s, 10_000, 50) for s in order]
    params = [module.estimate_params(c) for c in configs]
    mems = [module.estimate_memory_bytes(c, 64, 50) for c in configs]
    assert params == sorted(params) and len(set(params)) == len(params)
    assert mems == sorted(mems) and len(set(mems)) == len(mems)
    c = configs[1]
    by_batch = [module.estimate_memory_bytes(c, b, 50) for b in (1, 8, 64, 512)]
    by_len = [module.estimate_memory_bytes(c, 64, n) for n in (10, 50, 200)]
    assert by_batch == sorted(by_batch) and by_len == sorted(by_len) and by_batch[0] < by_batch[-1]
    assert mems[0] >= 16 * params[0]


@pytest.mark.parametrize(
    ("config_cls", "make"), [(hstu.HSTUConfig, hstu.hstu_config), (sasrec.SASRecConfig, sasrec.sasrec_config)]
)
def test_config_round_trip_and_errors(config_cls, make):
    config = make("1", 100, 20, dropout=0.3)
    assert config.dropout == 0.3
    assert config_cls(**dataclasses.asdict(config)) == config
    with pytest.raises(UsageError):
        make("huge", 100, 20)
    with pytest.raises(UsageError):
        make("1", 100, 20, n_heads=3)


@pytest.mark.parametrize("kind", KINDS)
def test_too_long_sequence_is_refused(kind):
    model = build(kind)
    items, ts = batch(seq=MAX_LEN + 1)
    with pytest.raises(UsageError):
        model(items, ts)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_autocast(kind):
    model = build(kind)
    items, ts = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(items, ts)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.float(), model(items, ts), rtol=0, atol=0.1)


def test_gather_bias_matches_embedding_lookup():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, 7, generator=g, requires_grad=True)
    index = torch.randint(0, 7, (2, 5, 5), generator=g)
    fast = hstu.gather_bias(table, hstu.head_index(index, 3, 7))
    slow = torch.nn.functional.embedding(index, table.T).permute(0, 3, 1, 2)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    upstream = torch.randn(2, 3, 5, 5, generator=g)
    (grad_fast,) = torch.autograd.grad(fast, table, upstream)
    (grad_slow,) = torch.autograd.grad(slow, table, upstream)
    torch.testing.assert_close(grad_fast, grad_slow)
