"""The recommender: a backbone whose states are decoded by prior-conditioned heads.

`MultiHeadRecommender` only wires parts that are built elsewhere and injected: the backbone
(`mhr.models.*`), the decoder (the prior heads `mhr.models.heads.PriorHeads`, or a baseline's interest
extractor) and the scorer (`mhr.models.heads.Scorer`). Choices by name go through the explicit
`BACKBONES` and `DECODERS` dicts.

The decoder contract (what `PriorHeads`, `ComiRecSA`, `REMI` and `DualVAE` implement):

- `sequence_level: bool` — False: decodes each state on its own (only the last state is decoded at
  inference); True: needs the whole sequence (interests pool over positions ≤ t).
- `decode(h [B, L, d], valid [B, L]) -> (q [B, L, K, d], aux)`: the K queries per position and a
  dict of auxiliary loss terms (already weighted; empty when there are none or in eval mode).
- `forward(h) -> q`: the queries alone (inference).
- `assign(q, item_vecs, scorer, targets [B, L, τ], compat [B, L, τ, K]) -> bool [B, L, τ, K]`:
  which heads each target trains — the prior's compatibility for prior heads, the best-scoring
  interest for ComiRec's hard readout.
- `eligibility(item_vecs [N+1, d]) -> bool [K, N+1] | None`: which items each head scores, when it
  depends on the model (DualVAE: each item's own aspect); None = the layout's fixed Ω_k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mhr.errors import UsageError
from mhr.models import comirec, dualvae, hllm, hstu, remi, sasrec
from mhr.models.heads import HeadLayout, HeadRouter, PriorHeads, Scorer, build_layout
from mhr.priors.synthetic import synthetic_prior


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone family: its config class, sizes and module class."""

    config_cls: type
    sizes: dict[str, dict[str, Any]]
    module_cls: Callable[..., nn.Module]
    estimate_memory: Callable[..., int]
    # reads item texts (HLLM): built from the catalogue's texts or their cached embeddings, so every
    # item, cold ones included, has a text-derived vector
    reads_item_texts: bool = False


BACKBONES: dict[str, Backbone] = {
    "hstu": Backbone(hstu.HSTUConfig, hstu.SIZES, hstu.HSTU, hstu.estimate_memory_bytes),
    "sasrec": Backbone(sasrec.SASRecConfig, sasrec.SIZES, sasrec.SASRec, sasrec.estimate_memory_bytes),
    "hllm": Backbone(hllm.HLLMConfig, hllm.SIZES, hllm.HLLM, hllm.estimate_memory_bytes, reads_item_texts=True),
}


@dataclass(frozen=True)
class DecoderOptions:
    """How the backbone's states are decoded: `heads` (the method) or a baseline's interests."""

    name: str = "heads"
    interests: int = 4
    routing_reg: float | None = None  # REMI's λ (None: the decoder's default)
    kl_weight: float = 0.2  # DualVAE
    kl_anneal_steps: int = 1000  # DualVAE
    contrast_weight: float = 0.1  # DualVAE


DECODERS: dict[str, Callable[[int, HeadLayout, DecoderOptions], nn.Module]] = {
    "heads": lambda d, layout, o: PriorHeads(d, layout),
    "comirec": lambda d, layout, o: comirec.ComiRecSA(d, o.interests, o.routing_reg or 0.0),
    "remi": lambda d, layout, o: remi.REMI(d, o.interests, o.routing_reg),
    "dualvae": lambda d, layout, o: dualvae.DualVAE(d, o.interests, o.kl_weight, o.kl_anneal_steps,
                                                    o.contrast_weight),
}


def interest_layout(n_interests: int, n_items: int) -> HeadLayout:
    """K heads named "interest 1".."interest K", each over the whole catalogue (an `all:K` layout)."""
    spec = synthetic_prior(f"all:{n_interests}", n_items, group_label="interest")
    return build_layout((spec,), "flat")


def backbone_config(name: str, size: str, n_items: int, max_len: int, **overrides: Any) -> Any:
    """The frozen config of backbone `name` at `size` for a catalogue of `n_items`."""
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}", hint=f"choose one of {', '.join(BACKBONES)}")
    family = BACKBONES[name]
    if size not in family.sizes:
        raise UsageError(
            f"backbone {name} has no size {size!r}", hint=f"choose one of {', '.join(family.sizes)}"
        )
    fields = {f.name for f in dataclasses.fields(family.config_cls)}
    values = {**family.sizes[size], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - fields
    if unknown:
        raise UsageError(f"backbone {name} has no setting {sorted(unknown)}")
    return family.config_cls(n_items=n_items, max_len=max_len, **values)


def refresh_eligibility(model: MultiHeadRecommender, compat) -> None:
    """Set `compat.omega` from the decoder when its eligibility depends on the weights (DualVAE)."""
    with torch.no_grad():
        own = model.heads.eligibility(model.item_vectors().float())
    if own is not None:
        compat.omega = own.to(compat.device)


class MultiHeadRecommender(nn.Module):
    """backbone → decoder (`heads`) → scorer. Shapes: items/ts [B, L] → q [B, L, K, d]."""

    def __init__(self, backbone: nn.Module, heads: nn.Module, scorer: Scorer, router: HeadRouter | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.scorer = scorer
        self.router = router  # p(k | h), trained jointly (`--router`); None: no router

    def forward(self, items: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return self.decode(items, ts)[0]

    def decode(self, items: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(queries [B, L, K, d], the decoder's auxiliary losses) for training."""
        return self.heads.decode(self.backbone(items, ts), items != 0)

    def item_vectors(self) -> torch.Tensor:
        return self.backbone.item_vectors()

    def last_queries(self, items: torch.Tensor, ts: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Head queries at each sequence's last real position: [B, K, d].

        Only the last position is decoded by per-state heads, since inference needs nothing else;
        a sequence-level decoder decodes the whole sequence and its last position is taken.
        """
        return self.last_decode(items, ts, length)[0]

    def last_decode(self, items: torch.Tensor, ts: torch.Tensor,
                    length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(head queries [B, K, d], the router's log p(k | h) [B, K] or None) at the last position."""
        h = self.backbone(items, ts)
        rows, last = torch.arange(h.shape[0], device=h.device), (length - 1).clamp(min=0)
        h_last = h[rows, last]
        q = self.heads(h)[rows, last] if self.heads.sequence_level else self.heads(h_last)
        route = None if self.router is None else torch.log_softmax(self.router(h_last).float(), dim=-1)
        return q, route


def build_model(
    backbone_name: str, config: Any, layout: HeadLayout, score: str, temperature: float,
    decoder: DecoderOptions = DecoderOptions(), router: bool = False, **backbone_inputs: Any,
) -> MultiHeadRecommender:
    """`backbone_inputs` are tensors a backbone is built from (HLLM: the cached item text embeddings)."""
    if decoder.name not in DECODERS:
        raise UsageError(f"unknown decoder {decoder.name!r}", hint=f"choose one of {', '.join(DECODERS)}")
    family = BACKBONES[backbone_name]
    backbone = family.module_cls(config, **backbone_inputs)
    heads = DECODERS[decoder.name](config.d, layout, decoder)
    return MultiHeadRecommender(backbone, heads, Scorer(mode=score, init_temperature=temperature),
                                HeadRouter(config.d, layout.n_heads) if router else None)
