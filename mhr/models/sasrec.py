"""SASRec: self-attentive sequential recommendation, the standard baseline backbone.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv 1808.09781). As in
the authors' code, blocks are pre-LN on the query side only:

    Q = LN(X);  X = Q + Attn(Q, X, X)        (causal softmax attention, keys/values from X)
    X = LN(X);  X = X + FFN(X)               (point-wise: Linear, ReLU, Linear, with dropout)
    X = X * valid                            (padded positions zeroed after every block)

followed by a final LayerNorm. Item embeddings are scaled by sqrt(d) and learned absolute
positions added. Departures: sequences are right-padded (the original left-pads); the attention
has an output projection (as the widely used PyTorch port; the TF original has none); timestamps
are accepted and ignored, so SASRec and HSTU share one interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mhr.errors import UsageError

# "1" is the paper's setting (2 blocks, 1 head; d = 50 there, 64 here); "2" a wider variant.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_layers": 2, "n_heads": 2, "d": 32, "dropout": 0.2},
    "1": {"n_layers": 2, "n_heads": 1, "d": 64, "dropout": 0.2},
    "2": {"n_layers": 2, "n_heads": 2, "d": 128, "dropout": 0.2},
}


@dataclass(frozen=True)
class SASRecConfig:
    """Everything needed to rebuild a `SASRec`; round-trips through `dataclasses.asdict`.

    ffn_dim None means d (the paper's point-wise FFN keeps the width).
    """

    n_items: int
    max_len: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    ffn_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise UsageError(
                f"SASRec needs n_items >= 1 and max_len >= 1 (got {self.n_items}, {self.max_len})"
            )
        if self.d < 1 or self.n_layers < 0 or self.n_heads < 1 or self.d % self.n_heads:
            raise UsageError(
                f"SASRec size out of range: d={self.d}, n_layers={self.n_layers}, n_heads={self.n_heads}",
                hint="n_heads must divide d",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", self.d)


def sasrec_config(size: str, n_items: int, max_len: int, **overrides: Any) -> SASRecConfig:
    """The config of size `size` ("tiny", "1", "2") with `overrides` applied."""
    if size not in SIZES:
        raise UsageError(f"SASRec has no size {size!r}", hint=f"choose one of {', '.join(SIZES)}")
    return SASRecConfig(n_items=n_items, max_len=max_len, **{**SIZES[size], **overrides})


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.d
        self.n_heads = config.n_heads
        self.p = config.dropout
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.ffn_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ffn_dim, d),
            nn.Dropout(config.dropout),
        )
        self.dropout = nn.Dropout(config.dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; keep [B, 1, L, L] bool (True = may attend); valid [B, L, 1]."""
        b, seq, d = x.shape
        h = self.n_heads
        qn = self.attn_norm(x)
        q = self.q(qn).view(b, seq, h, d // h).transpose(1, 2)
        k, v = self.kv(x).view(b, seq, 2, h, d // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0
        )
        x = qn + self.dropout(self.out(a.transpose(1, 2).reshape(b, seq, d)))
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x * valid


class SASRec(nn.Module):
    """SASRec backbone: items [B, L] (ts ignored) -> states h [B, L, d]; right-padded with 0."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        std = math.sqrt(1.0 / d)
        nn.init.trunc_normal_(self.position_embedding.weight, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def item_vectors(self) -> torch.Tensor:
        """The item embedding table used for scoring: [n_items + 1, d] (row 0 = padding)."""
        return self.item_embedding.weight

    def forward(self, items: torch.Tensor, ts: torch.Tensor | None = None) -> torch.Tensor:
        """items [B, L] (0 = padding), ts ignored -> h [B, L, d]."""
        _, seq = items.shape
        if seq > self.config.max_len:
            raise UsageError(
                f"sequence length {seq} exceeds the model's max_len {self.config.max_len}",
                hint="cut sequences to the context length the model was built for",
            )
        valid = (items != 0).unsqueeze(-1)
        pos = torch.arange(seq, device=items.device)
        x = self.item_embedding(items) * math.sqrt(self.config.d) + self.position_embedding(pos)
        x = self.input_dropout(x) * valid
        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)
        # A query may always see itself, so an all-padding row never softmaxes over nothing (NaN).
        keep = causal & (valid.transpose(1, 2) | torch.eye(seq, dtype=torch.bool, device=items.device))
        keep = keep.unsqueeze(1)  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, keep, valid)
        return self.final_norm(x)


def estimate_params(config: SASRecConfig) -> int:
    """Exact parameter count of `SASRec(config)` without building it."""
    d, f = config.d, config.ffn_dim
    block = 4 * d + 4 * (d * d + d) + (d + 1) * f + (f + 1) * d
    return (config.n_items + 1) * d + config.max_len * d + config.n_layers * block + 2 * d


def estimate_memory_bytes(config: SASRecConfig, batch: int, seq_len: int, bytes_per_value: int = 4) -> int:
    """Rough peak training memory: fp32 weights + gradients + AdamW moments (16 bytes a parameter)
    and activations (about 12 [B, L, d] tensors plus 3 [B, H, L, L] maps a layer). Logits excluded."""
    d, h = config.d, config.n_heads
    per_layer = batch * seq_len * (10 * d + 3 * config.ffn_dim) + 3 * batch * h * seq_len * seq_len
    activations = (config.n_layers * per_layer + 4 * batch * seq_len * d) * bytes_per_value
    return 16 * estimate_params(config) + activations
