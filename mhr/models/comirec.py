"""ComiRec-SA: K user interests from a self-attentive layer over the backbone's states.

Cen et al., "Controllable Multi-Interest Framework for Recommendation" (KDD 2020), the SA variant,
re-implemented as a *decoder* on the same backbone and loss as the prior heads, so the comparison
is fair (the paper's Table 3 does the same on HSTU):

    a_s = W2 tanh(W1 h_s)  ∈ R^K                       (W1: d → 4d, W2: 4d → K, no biases)
    A_{t,s,k} = softmax_{s ≤ t}(a_{s,k})               (attention over positions, per interest)
    v_{t,k} = Σ_{s ≤ t} A_{t,s,k} h_s                  (interest k of the prefix ending at t)

Where this departs from the original, and why:

- The original pools one sequence into K vectors. Here every position t gets its own K interests
  from the prefix s ≤ t (a causal mask on A), because the shared loss trains every position to
  predict its next τ items; at inference the last position's interests are used, which is the
  original's computation on the whole history.
- The backbone's states already carry positions (HSTU/SASRec), so no extra position embedding is
  added before W1.
- Training readout is the original *hard* readout: each target trains only the interest that
  scores it highest (`assign`), through the shared multi-head loss (softmax over all items, or
  sampled negatives). At inference the K interests are heads over the whole catalogue; max
  fusion is exactly ComiRec's per-interest top-N merge. Its greedy category-diversity
  re-ranking (λ) is `mhr eval --diversity λ` (applies to any run).

REMI (`mhr.models.remi`) is this module plus routing regularisation and hard-negative weighting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ComiRecSA(nn.Module):
    """h [B, L, d] -> interests q [B, L, K, d] (position t sees positions ≤ t only)."""

    sequence_level = True  # needs the whole sequence, not one state at a time

    def __init__(self, d: int, interests: int, routing_reg: float = 0.0) -> None:
        super().__init__()
        if interests < 1:
            raise ValueError(f"interests must be >= 1, got {interests}")
        self.d = d
        self.n_interests = interests
        self.routing_reg = float(routing_reg)
        self.w1 = nn.Linear(d, 4 * d, bias=False)
        self.w2 = nn.Linear(4 * d, interests, bias=False)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """A [B, L(t), L(s), K]: softmax over s ≤ t of W2 tanh(W1 h_s); zero for s > t."""
        length = h.shape[1]
        a = self.w2(torch.tanh(self.w1(h)))  # [B, L, K]
        future = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)  # s > t
        logits = a.unsqueeze(1).expand(-1, length, -1, -1).masked_fill(future[None, :, :, None], float("-inf"))
        return torch.softmax(logits.float(), dim=2).to(h.dtype)

    def decode(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(interests [B, L, K, d], auxiliary losses {'routing': λ·RR} when λ > 0 and training).
        `valid` [B, L]: the real (non-padding) positions, over which the regulariser averages."""
        attn = self.attention(h)
        q = torch.einsum("btsk,bsd->btkd", attn, h)
        aux: dict[str, torch.Tensor] = {}
        if self.routing_reg > 0 and self.training:
            aux["routing"] = self.routing_reg * routing_regulariser(attn, self.d, valid)
        return q, aux

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decode(h)[0]

    def assign(self, q: torch.Tensor, item_vecs: torch.Tensor, scorer, targets: torch.Tensor,
               compat: torch.Tensor) -> torch.Tensor:
        """Hard readout: target (b, t, j) is a positive of its highest-scoring interest only.

        q [B, L, K, d], targets [B, L, τ], compat [B, L, τ, K] -> bool [B, L, τ, K]."""
        return hard_readout(q, item_vecs, scorer, targets, compat)

    def eligibility(self, item_vecs: torch.Tensor) -> None:
        """None: every interest scores the whole catalogue (the layout's Ω)."""
        return None

    def extra_repr(self) -> str:
        return f"d={self.d}, interests={self.n_interests}, routing_reg={self.routing_reg}"


@torch.no_grad()
def hard_readout(q: torch.Tensor, item_vecs: torch.Tensor, scorer, targets: torch.Tensor,
                 compat: torch.Tensor) -> torch.Tensor:
    """One-hot of argmax_k s(q[b, t, k], e_y) over the compatible heads, for every target y."""
    e = item_vecs[targets.long()]  # [B, L, τ, d]
    scores = scorer(q.unsqueeze(2), e.unsqueeze(-2)).squeeze(-1)  # [B, L, τ, K]
    scores = scores.masked_fill(~compat, float("-inf"))
    best = scores.argmax(dim=-1, keepdim=True)
    return F.one_hot(best.squeeze(-1), q.shape[2]).to(torch.bool) & compat


def routing_regulariser(attn: torch.Tensor, d: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REMI's routing regularisation, per position t: ‖diag((A_t − Ā_t)(A_t − Ā_t)ᵀ / d)‖², with
    A_t [K, t + 1] the interests' attention over the prefix and Ā_t its mean over those positions;
    averaged over each sequence's positions and summed over the batch (as the original sums over
    sequences). attn [B, L(t), L(s), K]; valid [B, L] the real positions t (default all)."""
    length = attn.shape[1]
    count = torch.arange(1, length + 1, device=attn.device, dtype=attn.dtype)  # prefix sizes
    inside = torch.ones(length, length, dtype=torch.bool, device=attn.device).tril()  # s ≤ t
    mean = attn.sum(dim=2, keepdim=True) / count.view(1, -1, 1, 1)
    centred = (attn - mean) * inside[None, :, :, None]
    diag = centred.pow(2).sum(dim=2) / d  # [B, L, K]
    per_position = diag.pow(2).sum(dim=-1)  # [B, L]
    if valid is None:
        return per_position.mean(dim=1).sum()
    valid = valid.to(per_position.dtype)
    return ((per_position * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)).sum()
