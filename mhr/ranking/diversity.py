"""Greedy category-diversity re-ranking (ComiRec's controllable aggregation, Cen et al. 2020, §3.4).

Given each user's candidates with fused scores f(i), pick k items one at a time maximising

    Q(S) = Σ_{i ∈ S} f(i) + λ Σ_{i, j ∈ S} g(i, j),   g(i, j) = 1 if i and j share no category,

i.e. at each step the candidate with the largest f(i) + λ · #{j ∈ S : j shares no category with i}.
λ = 0 is the plain ranking; larger λ trades accuracy for category diversity. Categories come from
an item prior (multi-label allowed: two items "share a category" when their groups intersect).
Applies to any run — prior heads or a baseline's interests.
"""

from __future__ import annotations

import numpy as np
import torch


def greedy_diverse(items: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int, lam: float,
                   chunk: int = 256) -> np.ndarray:
    """Positions [U, k] into each row of `items` [U, M] (scores [U, M], −inf = no candidate) of the
    greedy selection; groups bool [G, N + 1] item categories. Ties: the earlier candidate."""
    n_users, m = items.shape
    k = min(k, m)
    cats = torch.from_numpy(np.ascontiguousarray(groups.T)).float()  # [N + 1, G]
    out = np.zeros((n_users, k), dtype=np.int64)
    for start in range(0, n_users, chunk):
        it = torch.from_numpy(items[start : start + chunk]).long()
        f = torch.from_numpy(scores[start : start + chunk]).double()
        c = cats[it]  # [u, M, G]
        differ = (torch.einsum("umg,ung->umn", c, c) == 0).double()  # share no category
        chosen = torch.zeros(f.shape, dtype=torch.bool)
        bonus = torch.zeros_like(f)  # Σ_{j ∈ S} g(i, j) per candidate
        rows = torch.arange(len(f))
        for step in range(k):
            gain = f + lam * bonus
            gain = torch.where(torch.isfinite(gain), gain, -1e300).masked_fill(chosen, float("-inf"))
            pick = gain.argmax(dim=1)
            chosen[rows, pick] = True
            bonus += differ[rows, pick]
            out[start : start + len(f), step] = pick.numpy()
    return out
