"""DualVAE decoder: posterior and sampling, the KL / contrast / prototype terms against slow
references, annealing, prototype routing, gradients, and a tiny run that trains, resumes and evaluates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mhr.models.dualvae import PROTOTYPE_WEIGHT, TEMPERATURE, DualVAE, kl_divergence
from mhr.models.heads import Compatibility
from mhr.models.multihead import DecoderOptions, backbone_config, build_model, interest_layout
from mhr.ranking.evaluate import EvalParams, evaluate
from mhr.training.params import TrainParams
from mhr.training.runs import load_run
from mhr.training.step import LossStep
from mhr.training.train import train
from mhr.windows import build_windows
from tests.helpers import interrupt_at_batch, make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=3, patience=0, lr=3e-3, warmup_steps=2)
VALID = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)


def decoder(seed: int = 0, d: int = 6, aspects: int = 3, **kw) -> DualVAE:
    """A DualVAE with every parameter moved off its initial value, so aspects differ."""
    torch.manual_seed(seed)
    dec = DualVAE(d, aspects, **kw)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return dec


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


# ----------------------------------------------------------------------------- posterior, modes


def test_shapes_init_and_aux_keys():
    torch.manual_seed(0)
    dec = DualVAE(8, 3, kl_weight=0.2, kl_anneal_steps=10, contrast_weight=0.1)
    h = torch.randn(4, 5, 8)
    q, aux = dec.decode(h, VALID)
    assert q.shape == (4, 5, 3, 8) and set(aux) == {"kl", "contrast", "prototype"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in aux.values())
    assert dec(h[:, -1]).shape == (4, 3, 8) and dec(h).shape == (4, 5, 3, 8)
    mu, logvar = dec.posterior(h)
    assert torch.equal(mu, h.unsqueeze(2).expand(-1, -1, 3, -1))  # every aspect is h at step 0
    assert torch.allclose(logvar, torch.full_like(logvar, -4.0))
    # a zero weight drops its term (the prototypes always learn)
    _, aux = DualVAE(8, 3, kl_weight=0.0, contrast_weight=0.0).decode(h, VALID)
    assert set(aux) == {"prototype"}
    with pytest.raises(ValueError):
        DualVAE(8, 0)
    with pytest.raises(ValueError):
        DualVAE(8, 2, kl_weight=-1.0)


def test_eval_mode_is_the_posterior_mean_and_has_no_aux():
    dec = decoder(1)
    h = torch.randn(4, 5, 6)
    mu, _ = dec.posterior(h)
    dec.train()
    q1, _ = dec.decode(h, VALID)
    q2 = dec(h)
    assert not torch.allclose(q1, mu) and not torch.allclose(q1, q2)  # sampled in training
    dec.eval()
    step = int(dec.kl_step)
    q, aux = dec.decode(h, VALID)
    assert aux == {} and torch.equal(q, mu) and torch.equal(dec(h), mu)
    assert torch.equal(dec(h[:, 2]), mu[:, 2])  # the last state alone decodes the same
    assert int(dec.kl_step) == step  # eval decodes leave the annealing clock alone


def test_training_samples_follow_the_global_seed():
    dec = decoder(2)
    h = torch.randn(4, 5, 6)
    torch.manual_seed(7)
    a, _ = dec.decode(h, VALID)
    torch.manual_seed(7)
    b, _ = dec.decode(h, VALID)
    assert torch.equal(a, b)
    mu, logvar = dec.posterior(h)
    torch.manual_seed(7)
    assert torch.allclose(a, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu), atol=1e-6)


# ------------------------------------------------------------------------ the auxiliary terms


def test_kl_matches_slow_reference():
    dec = decoder(3, kl_weight=0.5, kl_anneal_steps=0)
    h = torch.randn(4, 5, 6)
    _, aux = dec.decode(h, VALID)
    with torch.no_grad():
        mu, logvar = dec.posterior(h)
    per_position = []
    for b in range(4):
        for t in range(5):
            if not VALID[b, t]:
                continue
            kls = []
            for k in range(3):
                q = torch.distributions.Normal(mu[b, t, k].double(), torch.exp(0.5 * logvar[b, t, k]).double())
                p = torch.distributions.Normal(torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
                kls.append(float(torch.distributions.kl_divergence(q, p).sum()) / 6)  # per dimension
            per_position.append(sum(kls) / 3)
    ref = sum(per_position) / len(per_position)
    assert math.isclose(aux["kl"].item(), 0.5 * ref, rel_tol=1e-5)


def _contrast_reference(h, mu, z, protos, valid) -> float:
    """Slow InfoNCE of the module docstring, part 4, position by position."""
    batch, length, aspects, _ = mu.shape

    def p_aspect(x):
        return torch.softmax(torch.tensor([_cos(x, c) for c in protos]) / TEMPERATURE, dim=0)

    hood = {}
    for b in range(batch):
        for t in range(length):
            history = [s for s in range(t) if valid[b, s]]
            if valid[b, t] and history:
                hood[b, t] = [sum(p_aspect(h[b, s])[k] * mu[b, s, k] for s in history) for k in range(aspects)]
    per_position = []
    for (b, t), n in hood.items():
        ces = []
        for k in range(aspects):
            pos = _cos(z[b, t, k], n[k]) / TEMPERATURE
            negs = [_cos(z[b, t, k], n[j]) / TEMPERATURE for j in range(aspects) if j != k]
            negs += [_cos(z[b, t, k], hood[c, t][k]) / TEMPERATURE for c in range(batch) if c != b and (c, t) in hood]
            ces.append(-pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negs)))
        per_position.append(sum(ces) / aspects)
    return sum(per_position) / len(per_position)


def _prototype_reference(mu, protos, valid) -> float:
    per_position = []
    for b, t in zip(*torch.nonzero(valid, as_tuple=True), strict=True):
        ces = []
        for k in range(mu.shape[2]):
            logits = torch.tensor([_cos(mu[b, t, k], c) for c in protos]) / TEMPERATURE
            ces.append(-float(torch.log_softmax(logits, dim=0)[k]))
        per_position.append(sum(ces) / len(ces))
    return sum(per_position) / len(per_position)


def test_contrast_and_prototype_terms_match_slow_references():
    dec = decoder(4, contrast_weight=0.3)
    h = torch.randn(4, 5, 6)
    z, aux = dec.decode(h, VALID)  # in training mode the queries are the samples z
    with torch.no_grad():
        mu, _ = dec.posterior(h)
        ref = _contrast_reference(h, mu, z, dec.prototypes, VALID)
        proto = _prototype_reference(mu, dec.prototypes, VALID)
    assert math.isclose(aux["contrast"].item(), 0.3 * ref, rel_tol=1e-4)
    assert math.isclose(aux["prototype"].item(), PROTOTYPE_WEIGHT * proto, rel_tol=1e-4)
    # no position with a history (every sequence one item long): a zero, not a NaN
    _, aux = dec.decode(h[:, :1], VALID[:, :1])
    assert aux["contrast"].item() == 0.0


def test_terms_stay_float32_under_bfloat16_autocast():
    dec = decoder(8, d=8)
    h = torch.randn(4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, aux = dec.decode(h, VALID)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in aux.values())


def test_kl_annealing_ramps_linearly_and_its_clock_is_saved():
    dec = decoder(5, kl_weight=0.4, kl_anneal_steps=4)
    h = torch.randn(4, 5, 6)
    with torch.no_grad():
        raw = float(kl_divergence(*dec.posterior(h), VALID))
    ratios = [dec.decode(h, VALID)[1]["kl"].item() / raw for _ in range(6)]
    assert ratios == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4], abs=1e-6)
    state = dec.state_dict()
    assert int(state["kl_step"]) == 6
    fresh = DualVAE(6, 3, kl_weight=0.4, kl_anneal_steps=4)
    fresh.load_state_dict(state)
    assert int(fresh.kl_step) == 6 and float(fresh.kl_scale()) == pytest.approx(0.4)
    half = DualVAE(6, 3, kl_weight=0.4, kl_anneal_steps=4)
    half.kl_step.fill_(2)
    assert float(half.kl_scale()) == pytest.approx(0.2)


# ---------------------------------------------------------------------------- prototype routing


def test_assign_picks_the_prototype_argmax_among_compatible_aspects():
    dec = DualVAE(4, 3)
    with torch.no_grad():
        dec.prototypes.copy_(torch.eye(3, 4))  # aspect k points along axis k
    items = torch.tensor([[0.0, 0, 0, 1], [5, 1, 0, 0], [0, 2, 1, 0], [0.1, 0, 3, 0], [1, 0, 0.9, 0]])
    assert dec.item_aspects(items[1:]).tolist() == [0, 1, 2, 0]
    targets = torch.tensor([[[1, 2], [3, 4]]])  # [B=1, L=2, τ=2]
    compat = torch.ones(1, 2, 2, 3, dtype=torch.bool)
    q = torch.randn(1, 2, 3, 4)  # ignored: the item side decides
    sel = dec.assign(q, items, None, targets, compat)
    expected = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).bool()
    assert torch.equal(sel, expected)
    compat[0, 1, 1, 0] = False  # item 4's own aspect is not allowed: its next nearest (2) is
    sel = dec.assign(q, items, None, targets, compat)
    assert sel[0, 1, 1].tolist() == [False, False, True] and sel.sum() == 4


# ------------------------------------------------------------------------ through the model


def test_gradients_reach_every_parameter_in_a_training_step():
    n_items = 20
    torch.manual_seed(6)
    layout = interest_layout(3, n_items)
    config = backbone_config("hstu", "tiny", n_items, 8)
    model = build_model("hstu", config, layout, "cosine", 0.05,
                        DecoderOptions("dualvae", 3, kl_weight=0.2, kl_anneal_steps=0, contrast_weight=0.1))
    model.train()
    compat = Compatibility(layout, n_items)
    params = TrainParams(decoder="dualvae", interests=3, gamma=1.0)
    step = LossStep(model, compat, params, torch.Generator().manual_seed(0), compat.omega)
    items = torch.randint(1, n_items + 1, (4, 8))
    items[1, 5:] = 0
    ts = torch.arange(8).expand(4, -1) * 3600
    targets = torch.randint(1, n_items + 1, (4, 8, 2)) * (items != 0).unsqueeze(-1)
    loss, stats = step(items, ts, targets, torch.zeros_like(targets), torch.arange(1, 5))
    assert torch.isfinite(loss) and {"kl", "contrast", "prototype"} <= set(stats)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("heads."):
            assert p.grad.abs().sum() > 0, name
    assert int(model.heads.kl_step) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ds = make_dataset(tmp_path_factory.mktemp("dualvae") / "ws")
    build_windows(ds, context=12, horizon=4)
    return ds


def test_tiny_run_trains_and_evaluates(tiny):
    p = TrainParams(decoder="dualvae", interests=3, kl_anneal_steps=3, max_steps=6, **TINY)
    r = train(tiny, p, name="dv", show_progress=False)
    log = [json.loads(x) for x in (r.path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7)) and all(np.isfinite(e["loss"]) for e in log)
    assert np.isfinite(r.best["valid_ndcg@10"])
    assert int(load_file(r.path / "checkpoint" / "model.safetensors")["heads.kl_step"]) == 6
    run = load_run(tiny, "dv")
    assert isinstance(run.model.heads, DualVAE) and run.model.heads.kl_anneal_steps == 3
    assert run.layout.names == ("interest 1", "interest 2", "interest 3")
    # each item is scored by its own aspect only: the loaded sets come from the prototypes
    own = run.model.heads.item_aspects(run.model.item_vectors())[1:]
    omega = run.compat.omega
    assert not omega[:, 0].any() and (omega[:, 1:].sum(0) == 1).all()
    assert torch.equal(omega[:, 1:].float().argmax(0), own)
    out, result, _ = evaluate(tiny, "dv", EvalParams(split="valid", ks=(5, 10)))
    assert out.is_file() and 0.0 <= result["metrics"]["ndcg@10/h4"] <= 1.0
    assert sum(result["head_usage@10"].values()) == pytest.approx(1.0)
    # the DualVAE settings are in the run key; another KL weight is another run
    assert p.as_dict()["kl_weight"] == 0.2 and "kl_weight" not in TrainParams().as_dict()


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    """Sampling noise comes from torch's global RNG (restored from the checkpoint) and the
    annealing clock is a saved buffer, so an interrupted run ends as an uninterrupted one."""

    p = TrainParams(decoder="dualvae", interests=2, kl_anneal_steps=4, max_steps=6, **TINY)
    ref_ds = make_dataset(tmp_path / "ref")
    build_windows(ref_ds, context=12, horizon=4)
    ref = train(ref_ds, p, name="r", show_progress=False)

    ds = make_dataset(tmp_path / "crash")
    build_windows(ds, context=12, horizon=4)
    # killed during step 5, after the step-3 checkpoint
    interrupt_at_batch(monkeypatch, 5, lambda: train(ds, p, name="r", show_progress=False))
    resumed = train(ds, p, name="r", resume=True, show_progress=False)
    for sub in ("", "checkpoint/"):
        a = load_file(ref.path / f"{sub}model.safetensors")
        b = load_file(resumed.path / f"{sub}model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    la = [json.loads(x)["loss"] for x in (ref.path / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (resumed.path / "log.jsonl").read_text().splitlines()]
    assert la == lb
