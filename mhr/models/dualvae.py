"""DualVAE: K aspect posteriors per state; targets routed to aspects by learned item prototypes.

Guo et al., "DualVAE: Dual Disentangled Variational AutoEncoder for Recommendation" (SDM 2024;
the authors' code is github.com/georgeguo-cn/DualVAE), re-implemented as a *decoder* on the same
backbone and the same multi-head loss as the prior heads, ComiRec-SA and REMI, so the comparison
is about decoding only. The original is a collaborative-filtering model: two VAEs, one over users'
interaction vectors and one over items' (hence "dual"), trained in alternation. Its four parts, and
what each becomes here:

1. Attention-aware dual disentanglement. A aspects, each with a prototype c_a; item i belongs to
   aspect a with probability softmax_a(β_i^a · c_a), and a user's aspect-a input is the interaction
   vector reweighted by it. Here: K learnable prototypes c_k [K, d] in the space where queries score
   items, and the aspect of item i is argmax_k cos(c_k, e_i), e_i the backbone's item vector.
2. Disentangled variational inference. Per aspect a Gaussian posterior, KL to N(0, I), sampling by
   reparameterisation. Here: per-aspect linear encoders of the backbone state h, batched as one
   [K, d, d] matmul each (like `PriorHeads`):

       μ_k = h + W^μ_k h + b^μ_k        log σ²_k = W^σ_k h + b^σ_k
       q_k = z_k = μ_k + σ_k ⊙ ε (training, ε ~ N(0, I) from torch's global RNG)    q_k = μ_k (eval)

   The original feeds one shared encoder A reweighted copies of the interaction vector; the
   backbone has already pooled the history into h, so the aspects get their own weights instead.
   W^μ, W^σ start at zero (every aspect is h at step 0, as every prior head is) and log σ² at
   −4 (σ ≈ 0.14 against LayerNorm-scale states), so noise grows only as far as the KL pushes it.
   (The released code bounds σ by a sigmoid; log σ² is linear here, as in the standard VAE.)
3. Joint generation. x̂_ui = Σ_a p(a|i) f(z_u^a, β_i^a) under a Poisson likelihood. Here: the shared
   multi-head loss with the hard version of p(a|i) — target y trains only the aspect of y (`assign`),
   so aspects are disentangled by item clusters; like ComiRec's hard readout, but decided by the item
   side. The same hard p(a|i) decides which items an aspect scores (`eligibility`): aspect a's
   softmax runs over the items of aspect a only (in-aspect negatives) and at inference item i is
   scored by its own aspect only — the x̂_ui = f(z_u^{a(i)}, β_i) of a hard p(a|i). (A first version
   let every aspect score the whole catalogue: each aspect then learned "my cluster is likely" for
   every user and max fusion compared cluster priors — validation NDCG@10 fell from 3.2% to 1.6%
   over 4 epochs on MovieLens-100K, the failure `--negatives-from global` shows for prior heads.)
4. Neighbourhood-enhanced representation constraint. InfoNCE (τ = 0.2) between z_u^a and the user's
   aspect-a neighbourhood Σ_i x̂^a_ui β_i^a (item representations weighted by the predicted aspect-a
   interactions), the negatives being the user's other aspects (independence) and the same aspect of
   the other users in the batch (the released code also counts the positive in both of those sums;
   here it is counted once, the usual InfoNCE). Here a sequence's neighbourhood at t is the history
   it actually has: n_{t,k} = Σ_{s<t} p(k | h_s) μ_{s,k},
   each earlier state routed to aspects as an item would be, p(k | h_s) = softmax_k(cos(c_k, h_s)/τ),
   and contributing its aspect-k encoding. The decoder sees states, not item ids, so h_s (the state
   right after item s was read) stands for item s; s < t strictly, or the anchor's own mean would be
   in its positive; prototypes are detached there (they have their own term, below). Negatives: the
   other aspects of the same position, and aspect k of the other sequences in the batch at the same
   step t (in-batch users, as in the original). Cost: [B, L, K, B] logits, training only.

Losses (`decode`'s aux, training mode only, each already weighted):

- "kl": w(step) · KL(N(μ, σ²) ‖ N(0, I)) averaged over valid positions, aspects *and dimensions*,
  with w rising linearly from 0 to `kl_weight` over `kl_anneal_steps` training steps (annealing as
  in Mult-VAE, Liang et al. 2018; the released DualVAE code keeps its β constant). Per dimension,
  not summed: the shared loss is a mean cross-entropy of order ln N per target, and a sum over d
  would make the same weight mean 32 to 2048 times more by model size (at d = 128 and w = 0.2 the
  summed KL starts near 50, several times the recommendation loss: posterior collapse). The step count is
  a persistent buffer, so it is in every checkpoint and a resumed run anneals exactly as an
  uninterrupted one.
- "contrast": `contrast_weight` · the InfoNCE of part 4.
- "prototype": 0.1 · cross-entropy of softmax_j(cos(c_j, μ_k)/τ) against k, μ detached. The
  original trains c_a through the generation likelihood, i.e. towards the aspect whose match
  explains each observed interaction; that needs the targets, which `decode` never sees (`assign`
  sees them but the contract lets it return no loss). Here c_k learns the direction of user
  aspect k instead: aspect k's queries are trained towards the items routed to it, so an item's
  nearest prototype is the aspect whose queries score it highest on average — the population-level
  counterpart of the original's per-interaction signal, and a k-means-like alternation (items →
  aspects → prototypes). Only the prototypes move, so the weight sets little beyond the logged
  total (Adam normalises step sizes); 0.1 keeps that total close to the recommendation loss.

Left out: the item-side VAE and the alternating optimisation (items keep the backbone's single
embedding, the table every method scores with, so the comparison is not about item tables), the
Poisson likelihood, and the tanh MLP term of the original's interaction function f.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.2  # the original's InfoNCE temperature; also the prototypes' softmax temperature
LOGVAR_INIT = -4.0  # log σ² at step 0: σ ≈ 0.14 per dimension, states are LayerNorm-scale (≈ 1)
PROTOTYPE_WEIGHT = 0.1


class DualVAE(nn.Module):
    """h [..., d] -> aspect queries q [..., K, d]: per aspect a Gaussian posterior, sampled in
    training mode, its mean in eval mode."""

    sequence_level = False  # decodes each state on its own (`mhr.models.multihead` decoder contract)

    def __init__(self, d: int, aspects: int, kl_weight: float = 0.2, kl_anneal_steps: int = 1000,
                 contrast_weight: float = 0.1) -> None:
        super().__init__()
        if aspects < 1:
            raise ValueError(f"aspects must be >= 1, got {aspects}")
        if kl_weight < 0 or contrast_weight < 0 or kl_anneal_steps < 0:
            raise ValueError("kl_weight, kl_anneal_steps and contrast_weight must be >= 0")
        self.d = d
        self.n_aspects = aspects
        self.kl_weight = float(kl_weight)
        self.kl_anneal_steps = int(kl_anneal_steps)
        self.contrast_weight = float(contrast_weight)
        self.weight_mu = nn.Parameter(torch.zeros(aspects, d, d))  # [K, d_out, d_in]
        self.bias_mu = nn.Parameter(torch.zeros(aspects, d))
        self.weight_logvar = nn.Parameter(torch.zeros(aspects, d, d))
        self.bias_logvar = nn.Parameter(torch.full((aspects, d), LOGVAR_INIT))
        self.prototypes = nn.Parameter(torch.randn(aspects, d))  # c_k; random, so item clusters differ
        # training decodes so far (the KL annealing clock); persistent, so checkpoints carry it
        self.register_buffer("kl_step", torch.zeros((), dtype=torch.long))

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²), both [..., K, d], for states h [..., d]."""
        lead, d = h.shape[:-1], h.shape[-1]
        x = h.reshape(-1, d)
        k = self.n_aspects
        mu = x.unsqueeze(1) + (x @ self.weight_mu.reshape(-1, d).t()).view(-1, k, d) + self.bias_mu
        logvar = (x @ self.weight_logvar.reshape(-1, d).t()).view(-1, k, d) + self.bias_logvar
        return mu.view(*lead, k, d), logvar.view(*lead, k, d)

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = μ + σ ⊙ ε in training mode (one draw from torch's global RNG), μ in eval mode."""
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def kl_scale(self) -> torch.Tensor:
        """The annealed KL weight at the current step: kl_weight · min(1, step / kl_anneal_steps)."""
        if self.kl_anneal_steps == 0:
            return torch.tensor(self.kl_weight, device=self.kl_step.device)
        return self.kl_weight * (self.kl_step.float() / self.kl_anneal_steps).clamp(max=1.0)

    def decode(self, h: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(queries [B, L, K, d], aux {'kl', 'contrast', 'prototype'} in training mode, {} in eval).
        `valid` [B, L]: the real (non-padding) positions, over which the terms average."""
        mu, logvar = self.posterior(h)
        z = self.sample(mu, logvar)
        aux: dict[str, torch.Tensor] = {}
        if not self.training:
            return z, aux
        if valid is None:
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # cosines over τ = 0.2: float32, not bf16
            if self.kl_weight > 0:
                aux["kl"] = self.kl_scale() * kl_divergence(mu, logvar, valid)
            if self.contrast_weight > 0:
                n, usable = neighbourhood(h, mu, self.prototypes.detach(), valid)
                aux["contrast"] = self.contrast_weight * neighbour_contrast(z, n, usable)
            aux["prototype"] = PROTOTYPE_WEIGHT * prototype_loss(mu.detach(), self.prototypes, valid)
        with torch.no_grad():
            self.kl_step += 1
        return z, aux

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The queries alone (no auxiliary terms, the annealing clock untouched)."""
        return self.sample(*self.posterior(h))

    @torch.no_grad()
    def item_aspects(self, item_vecs: torch.Tensor) -> torch.Tensor:
        """The aspect of each item: argmax_k cos(c_k, e_i). item_vecs [..., d] -> long [...]."""
        return prototype_similarity(item_vecs, self.prototypes).argmax(dim=-1)

    @torch.no_grad()
    def eligibility(self, item_vecs: torch.Tensor) -> torch.Tensor:
        """bool [K, N + 1]: aspect k scores the items whose aspect is k (item 0 none)."""
        with torch.autocast(item_vecs.device.type, enabled=False):
            own = F.one_hot(self.item_aspects(item_vecs.float()), self.n_aspects).t().to(torch.bool)
        own[:, 0] = False
        return own

    @torch.no_grad()
    def assign(self, q: torch.Tensor, item_vecs: torch.Tensor, scorer, targets: torch.Tensor,
               compat: torch.Tensor) -> torch.Tensor:
        """Target y trains the aspect of y only (its nearest prototype among the compatible heads).

        q [B, L, K, d] (unused: the item side decides), targets [B, L, τ], compat [B, L, τ, K]
        -> bool [B, L, τ, K]."""
        with torch.autocast(item_vecs.device.type, enabled=False):
            sim = prototype_similarity(item_vecs[targets.long()], self.prototypes)  # [B, L, τ, K]
        best = sim.masked_fill(~compat, float("-inf")).argmax(dim=-1)
        return F.one_hot(best, self.n_aspects).to(torch.bool) & compat

    def extra_repr(self) -> str:
        return (f"d={self.d}, aspects={self.n_aspects}, kl_weight={self.kl_weight}, "
                f"kl_anneal_steps={self.kl_anneal_steps}, contrast_weight={self.contrast_weight}")


def prototype_similarity(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(x, c_k) for every prototype: x [..., d], prototypes [K, d] -> [..., K] (float32)."""
    return F.normalize(x.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).t()


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per_position [B, L] over the True entries of mask [B, L] (0 when there are none)."""
    return torch.where(mask, per_position, 0.0).sum() / mask.sum().clamp(min=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per latent dimension, averaged over dimensions, aspects and the
    valid positions. mu, logvar [B, L, K, d]; valid [B, L]."""
    mu, logvar = mu.float(), logvar.float()
    per = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return _masked_mean(per.mean(dim=(-1, -2)), valid)


def neighbourhood(h: torch.Tensor, mu: torch.Tensor, prototypes: torch.Tensor,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's aspect neighbourhoods from its strict history, and where there is one.

    n[b, t, k] = Σ_{s < t, valid} p(k | h[b, s]) μ[b, s, k], p(k | h) = softmax_k(cos(c_k, h) / τ)
    (unnormalised: only its direction is used). h [B, L, d], mu [B, L, K, d], prototypes [K, d],
    valid [B, L] -> (n [B, L, K, d], usable bool [B, L]: valid with at least one valid s < t)."""
    p = torch.softmax(prototype_similarity(h, prototypes) / TEMPERATURE, dim=-1)  # [B, L, K]
    p = p * valid.unsqueeze(-1)
    total = torch.cumsum(p.unsqueeze(-1) * mu.float(), dim=1)
    n = torch.cat([torch.zeros_like(total[:, :1]), total[:, :-1]], dim=1)  # exclusive: s < t
    before = torch.cumsum(valid.long(), dim=1) - valid.long()
    return n, valid & (before > 0)


def neighbour_contrast(z: torch.Tensor, n: torch.Tensor, usable: torch.Tensor,
                       temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE of anchor z[b, t, k] against its neighbourhood n[b, t, k]; the negatives are
    n[b, t, j ≠ k] (the same position's other aspects) and n[c ≠ b, t, k] for the sequences c
    usable at step t (the other users in the batch). Averaged over aspects and usable positions.
    z, n [B, L, K, d]; usable [B, L]."""
    a = F.normalize(z.float(), dim=-1)
    m = F.normalize(n.float(), dim=-1)
    own = torch.einsum("btkd,btjd->btkj", a, m) / temperature  # [B, L, K, K]; the positive on the diagonal
    others = torch.einsum("btkd,ctkd->btkc", a, m) / temperature  # [B, L, K, B]
    batch = z.shape[0]
    other = ~torch.eye(batch, dtype=torch.bool, device=z.device)
    keep = usable.t().unsqueeze(0) & other.unsqueeze(1)  # [B(b), L(t), B(c)]: c ≠ b and usable at t
    others = others.masked_fill(~keep.unsqueeze(2), float("-inf"))
    logits = torch.cat([own, others], dim=-1)  # own is always finite, so no row is all -inf
    ce = logits.logsumexp(dim=-1) - own.diagonal(dim1=-2, dim2=-1)  # [B, L, K]
    return _masked_mean(ce.mean(dim=-1), usable)


def prototype_loss(mu: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax_j(cos(c_j, μ_k) / τ) against k: prototype k learns the direction of
    user aspect k. mu [B, L, K, d] (pass it detached to move only the prototypes), prototypes
    [K, d], valid [B, L]; averaged over aspects and valid positions."""
    logp = torch.log_softmax(prototype_similarity(mu, prototypes) / TEMPERATURE, dim=-1)  # [B, L, K, K]
    return _masked_mean(-logp.diagonal(dim1=-2, dim2=-1).mean(dim=-1), valid)
