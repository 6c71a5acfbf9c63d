"""HSTU: Hierarchical Sequential Transduction Units.

Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for
Generative Recommendations", ICML 2024 (arXiv 2402.17152), §3.2 and Eq. 1-3. One block is

    U, V, Q, K = Split(SiLU(f1(LN(X))))
    A          = SiLU(Q K^T + rab^{p,t}) / n        (pointwise: no softmax), causal
    Y          = f2(Dropout(U * LN(A V))) + X

Where this code departs from the paper and the authors' released code (generative-recommenders):

- The relative attention bias `rab^{p,t}` (a relative-position bucket bias plus a bias on the
  bucketed time gap) is **used**. The released code builds it and never adds it to the scores.
- The time gap of query i and key j is `ts[i] - ts[j]`, the query's *own* time. The released code
  uses the time of the item after the query, which leaks that item's timestamp into state i; here
  no state depends on anything at a later position (tested).
- `n` is the number of keys query i may attend to (valid keys at positions <= i: i + 1 for a real
  position of a right-padded sequence), not the padded length L. Normalising by L would make the
  states depend on how much padding a batch carries; a per-query count keeps every state causal
  and padding-invariant. (After `LN(A V)` the scale of `n` barely matters anyway.)
- The bias is per head (the released code shares one bias across heads); each layer has its own.
- The model returns raw states after a final LayerNorm; L2 normalisation and the learnable
  temperature belong to the scorer (`mhr.models.heads.Scorer`), not to the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mhr.errors import UsageError

# Paper Table 5 (layers / heads / d / dropout) plus a tiny size for tests.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_layers": 2, "n_heads": 2, "d": 32, "dropout": 0.1},
    "1": {"n_layers": 4, "n_heads": 4, "d": 128, "dropout": 0.1},
    "2": {"n_layers": 8, "n_heads": 8, "d": 256, "dropout": 0.1},
    "3": {"n_layers": 12, "n_heads": 8, "d": 512, "dropout": 0.2},
    "4": {"n_layers": 16, "n_heads": 16, "d": 1024, "dropout": 0.2},
    "1b": {"n_layers": 22, "n_heads": 32, "d": 2048, "dropout": 0.4},
}

TIME_BUCKETINGS = ("log", "sqrt")


@dataclass(frozen=True)
class HSTUConfig:
    """Everything needed to rebuild an `HSTU`; round-trips through `dataclasses.asdict`.

    attn_dim / linear_dim are per head (the paper's d_qk and d_v); None means d // n_heads.
    Time gaps are bucketed by `time_bucketing`: "log" = floor(ln(|dt| seconds) / 0.301) (about
    1.35x wider per bucket), "sqrt" = floor(sqrt(|dt|)); both clipped to n_time_buckets - 1.
    """

    n_items: int
    max_len: int
    d: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1
    attn_dim: int | None = None
    linear_dim: int | None = None
    n_time_buckets: int = 128
    time_bucketing: str = "log"
    time_bias: bool = True
    position_bias: bool = True

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise UsageError(f"HSTU needs n_items >= 1 and max_len >= 1 (got {self.n_items}, {self.max_len})")
        if self.d < 1 or self.n_layers < 0 or self.n_heads < 1:
            raise UsageError(
                f"HSTU size out of range: d={self.d}, n_layers={self.n_layers}, n_heads={self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.time_bucketing not in TIME_BUCKETINGS:
            raise UsageError(
                f"unknown time bucketing {self.time_bucketing!r}",
                hint=f"choose one of {', '.join(TIME_BUCKETINGS)}",
            )
        if self.n_time_buckets < 1:
            raise UsageError(f"n_time_buckets must be >= 1, got {self.n_time_buckets}")
        for name in ("attn_dim", "linear_dim"):
            if getattr(self, name) is None:
                if self.d % self.n_heads:
                    raise UsageError(
                        f"d={self.d} is not divisible by n_heads={self.n_heads}",
                        hint=f"set {name} explicitly or pick n_heads dividing d",
                    )
                object.__setattr__(self, name, self.d // self.n_heads)


def hstu_config(size: str, n_items: int, max_len: int, **overrides: Any) -> HSTUConfig:
    """The config of paper size `size` ("tiny", "1", "2", "3", "4", "1b") with `overrides` applied."""
    if size not in SIZES:
        raise UsageError(f"HSTU has no size {size!r}", hint=f"choose one of {', '.join(SIZES)}")
    return HSTUConfig(n_items=n_items, max_len=max_len, **{**SIZES[size], **overrides})


def bucketize_time(dt: torch.Tensor, method: str, n_buckets: int) -> torch.Tensor:
    """Bucket ids in [0, n_buckets) of time gaps `dt` (int seconds, any shape)."""
    gap = dt.abs().clamp(min=1).float()
    if method == "log":
        b = torch.log(gap) / 0.301
    else:
        b = torch.sqrt(gap)
    return b.long().clamp(max=n_buckets - 1)


def _trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


def head_index(index: torch.Tensor, n_heads: int, n_buckets: int) -> torch.Tensor:
    """Bucket ids [B, L, L] -> ids into a flattened [n_heads, n_buckets] table: [B, H, L, L]."""
    offsets = torch.arange(n_heads, device=index.device).view(n_heads, 1, 1) * n_buckets
    return index.unsqueeze(1) + offsets


def gather_bias(table: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """table [H, K] at `head_index` ids [B, H, L, L] -> bias [B, H, L, L].

    Same values as `F.embedding(index, table.T).permute(0, 3, 1, 2)`, but a 1-D gather whose
    backward is one scatter-add, several times faster than the embedding backward on CPU.
    """
    return table.reshape(-1).gather(0, flat_index.reshape(-1)).view(flat_index.shape)


class RelativeBias(nn.Module):
    """rab^{p,t}: a learned bias per head on the relative position i - j and the time-gap bucket."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        h = config.n_heads
        self.position = nn.Parameter(torch.empty(h, config.max_len)) if config.position_bias else None
        self.time = nn.Parameter(torch.empty(h, config.n_time_buckets)) if config.time_bias else None
        for p in (self.position, self.time):
            if p is not None:
                _trunc_normal_(p, 0.02)

    def forward(self, position_index: torch.Tensor, time_index: torch.Tensor | None) -> torch.Tensor | None:
        """`head_index` ids of relative positions [1, H, L, L] and time buckets [B, H, L, L]
        -> bias [B or 1, H, L, L] (None when both biases are off)."""
        bias = None
        if self.position is not None:
            bias = gather_bias(self.position, position_index)
        if self.time is not None and time_index is not None:
            t = gather_bias(self.time, time_index)
            bias = t if bias is None else bias + t
        return bias


class HSTUBlock(nn.Module):
    """One HSTU layer (Eq. 1-3) on [B, L, d] states."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.attn_dim = config.attn_dim
        self.linear_dim = config.linear_dim
        lin = config.n_heads * config.linear_dim
        att = config.n_heads * config.attn_dim
        self.norm = nn.LayerNorm(config.d, eps=1e-6)
        self.uvqk = nn.Linear(config.d, 2 * lin + 2 * att)
        self.out = nn.Linear(lin, config.d)
        self.rab = RelativeBias(config)
        self.dropout = nn.Dropout(config.dropout)
        for layer in (self.uvqk, self.out):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        position_index: torch.Tensor,
        time_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, L, d]; scale [B, 1, L, L] = 1/n where query i may see key j, else 0."""
        b, seq, _ = x.shape
        h, da, dl = self.n_heads, self.attn_dim, self.linear_dim
        uvqk = F.silu(self.uvqk(self.norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dl, h * dl, h * da, h * da], dim=-1)
        v = v.view(b, seq, h, dl).transpose(1, 2)
        q = q.view(b, seq, h, da).transpose(1, 2)
        k = k.view(b, seq, h, da).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)  # [B, H, L, L]
        bias = self.rab(position_index, time_index)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        attn = F.silu(scores) * scale.to(scores.dtype)
        av = (attn @ v).transpose(1, 2).reshape(b, seq, h * dl)
        y = u * F.layer_norm(av, (h * dl,), eps=1e-6)
        return x + self.out(self.dropout(y))


class HSTU(nn.Module):
    """The HSTU backbone: items [B, L] and timestamps [B, L] -> states h [B, L, d].

    Sequences are right-padded with item 0. State t depends only on items and timestamps at
    positions <= t; states at padded positions are finite and meaningless (callers mask them).
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(HSTUBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d)
        # As the reference code: small item vectors scaled up by sqrt(d) at the input.
        _trunc_normal_(self.item_embedding.weight, 0.02)
        _trunc_normal_(self.position_embedding.weight, math.sqrt(1.0 / d))
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def item_vectors(self) -> torch.Tensor:
        """The item embedding table used for scoring: [n_items + 1, d] (row 0 = padding)."""
        return self.item_embedding.weight

    def forward(self, items: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """items [B, L] (0 = padding), ts [B, L] int seconds -> h [B, L, d]."""
        cfg = self.config
        _, seq = items.shape
        if seq > cfg.max_len:
            raise UsageError(
                f"sequence length {seq} exceeds the model's max_len {cfg.max_len}",
                hint="cut sequences to the context length the model was built for",
            )
        valid = items != 0  # [B, L]
        pos = torch.arange(seq, device=items.device)
        x = self.item_embedding(items) * math.sqrt(cfg.d) + self.position_embedding(pos)
        x = self.input_dropout(x) * valid.unsqueeze(-1).to(x.dtype)

        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [L, L]: query i sees key j <= i
        keep = (causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)  # [B, 1, L, L]
        n = keep.sum(-1, keepdim=True).clamp(min=1)  # [B, 1, L, 1]
        scale = keep / n  # the causal/padding mask and the 1/n normalisation in one factor
        rel_pos = (pos.unsqueeze(1) - pos.unsqueeze(0)).clamp(min=0)  # [L, L]
        position_index = head_index(rel_pos.unsqueeze(0), cfg.n_heads, cfg.max_len)
        time_index = None
        if cfg.time_bias:
            dt = ts.unsqueeze(2) - ts.unsqueeze(1)  # [B, L, L]: query time minus key time
            bucket = bucketize_time(dt, cfg.time_bucketing, cfg.n_time_buckets)
            time_index = head_index(bucket, cfg.n_heads, cfg.n_time_buckets)
        for block in self.blocks:
            x = block(x, scale, position_index, time_index)
        return self.final_norm(x)


def estimate_params(config: HSTUConfig) -> int:
    """Exact parameter count of `HSTU(config)` without building it."""
    d, h = config.d, config.n_heads
    lin, att = h * config.linear_dim, h * config.attn_dim
    bias = h * (config.max_len * config.position_bias + config.n_time_buckets * config.time_bias)
    block = 2 * d + (d + 1) * (2 * lin + 2 * att) + (lin + 1) * d + bias
    return (config.n_items + 1) * d + config.max_len * d + config.n_layers * block + 2 * d


def estimate_memory_bytes(config: HSTUConfig, batch: int, seq_len: int, bytes_per_value: int = 4) -> int:
    """Rough peak training memory of the backbone: weights, gradients, AdamW moments, activations.

    Weights, gradients and the two AdamW moments are fp32 (16 bytes a parameter). Activations
    kept for backward count about 4 [B, H, L, L] attention maps and 12 [B, L, d]-sized tensors
    a layer at `bytes_per_value` each. The scorer's logits are not included.
    """
    d, h = config.d, config.n_heads
    width = (
        2 * d + 2 * (2 * h * config.linear_dim + 2 * h * config.attn_dim) + 3 * h * config.linear_dim + 2 * d
    )
    per_layer = batch * seq_len * width + 4 * batch * h * seq_len * seq_len
    activations = (config.n_layers * per_layer + 4 * batch * seq_len * d) * bytes_per_value
    return 16 * estimate_params(config) + activations
