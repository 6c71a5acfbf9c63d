"""The recommender: a backbone whose states are decoded by prior-conditioned heads.

`MultiHeadRecommender` only wires parts that are built elsewhere and injected: the backbone
(`mhr.models.*`), the heads (`mhr.heads.PriorHeads`) and the scorer (`mhr.heads.Scorer`). The
choice of backbone by name goes through the one explicit `BACKBONES` dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mhr.errors import UsageError
from mhr.heads import HeadLayout, PriorHeads, Scorer
from mhr.models import hllm, hstu, sasrec


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone family: its config class, sizes and module class."""

    config_cls: type
    sizes: dict[str, dict[str, Any]]
    module_cls: Callable[..., nn.Module]
    estimate_memory: Callable[..., int]


BACKBONES: dict[str, Backbone] = {
    "hstu": Backbone(hstu.HSTUConfig, hstu.SIZES, hstu.HSTU, hstu.estimate_memory_bytes),
    "sasrec": Backbone(sasrec.SASRecConfig, sasrec.SIZES, sasrec.SASRec, sasrec.estimate_memory_bytes),
    "hllm": Backbone(hllm.HLLMConfig, hllm.SIZES, hllm.HLLM, hllm.estimate_memory_bytes),
}


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


class MultiHeadRecommender(nn.Module):
    """backbone → heads → scorer. Shapes: items/ts [B, L] → q [B, L, K, d]."""

    def __init__(self, backbone: nn.Module, heads: PriorHeads, scorer: Scorer) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.scorer = scorer

    def forward(self, items: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone(items, ts))

    def item_vectors(self) -> torch.Tensor:
        return self.backbone.item_vectors()

    def last_queries(self, items: torch.Tensor, ts: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Head queries at each sequence's last real position: [B, K, d].

        Only the last position is decoded by the heads, since inference needs nothing else.
        """
        h = self.backbone(items, ts)
        last = h[torch.arange(h.shape[0], device=h.device), (length - 1).clamp(min=0)]
        return self.heads(last)


def build_model(
    backbone_name: str, config: Any, layout: HeadLayout, score: str, temperature: float, **backbone_inputs: Any
) -> MultiHeadRecommender:
    """`backbone_inputs` are tensors a backbone is built from (HLLM: the cached item text embeddings)."""
    family = BACKBONES[backbone_name]
    backbone = family.module_cls(config, **backbone_inputs)
    return MultiHeadRecommender(
        backbone, PriorHeads(config.d, layout), Scorer(mode=score, init_temperature=temperature)
    )
