"""HLLM: an item LLM encodes each item's text, a user LLM models the sequence of item embeddings.

Chen et al., "HLLM: Enhancing Sequential Recommendations via Hierarchical Large Language Models"
(arXiv 2409.12740), §3. The item LLM reads an item's text with an appended [ITEM] token and its last
hidden state is the item embedding; the user LLM is a causal decoder fed the sequence of item
embeddings (`inputs_embeds`, no token ids) and its last hidden states are the user states, trained
with a contrastive loss against the item embeddings (here: the shared loss of `mhr.training.loss`).

Two ways to treat the item LLM:

- **Frozen** (the default, and a departure from the paper): its embeddings are computed once and
  cached by `mhr.item_texts.embed_items` (a [N + 1, d_item] table, row 0 = padding) and handed to
  the constructor, where they live as a buffer (saved with the weights, so a run rebuilds without
  the cache). "token" pooling then uses a fixed [ITEM] input embedding (the mean of the encoder's
  input-embedding table).
- **Fine-tuned end to end** (`train_item_llm=True`, `mhr train --train-item-llm`: the paper's
  setting). The backbone owns the encoder (`item_llm`, trainable, fp32 master weights; its unused
  pooler head is dropped) and every item's text tokenized once (`item_token_ids` int32 [N + 1, W],
  `item_token_lengths` [N + 1]; saved with the weights, so a run rebuilds from its config and
  `model.safetensors` alone); "token" pooling learns the [ITEM] token (`item_token`). A training
  step cannot re-encode the catalogue: inside `with model.encoding(ids):` the encoder runs once, with
  gradient, on the step's items only (the batch's inputs and targets and the sampled negatives,
  which is why training needs sampled negatives), and both `forward` and `item_vectors()` read
  those rows (the other rows of `item_vectors()` are 0 there, and never read by a sampled loss).
  In eval mode the whole catalogue is encoded in batches, without gradient, and kept until the
  weights can change (`train()`, a new `encoding` step, `load_state_dict`). Outside both — training
  mode, no step — every call encodes what it needs with gradient: the slow, obviously correct
  reference the step is tested against.

Fine-tuning shares the run's optimizer and learning rate with the user LLM: a pretrained encoder
usually wants a lower --lr than the from-scratch default.

Further choices, both ways:

- An `adapter` (linear, or a 2-layer MLP) maps item embeddings to the user LLM's width `d`; "mean"
  pooling is the default because the offline default item LLM is a sentence encoder
  (all-MiniLM-L6-v2) trained for it.
- One projected table serves both ends: the user LLM's input at an item and that item's vector for
  scoring (`item_vectors()`) are the same `adapter(E)[i]`, as in the paper where the item LLM's
  output is both the user LLM's input and the contrastive target. So every item with text, seen in
  training or not, is scored (cold start) through the same map.
- `--user-llm tiny` (sizes "tiny" and "1") is a small Llama-architecture decoder configured from
  scratch; any other value is a local directory or hub name of a `transformers` decoder, whose base
  model (no LM head) is used, and whose hidden size becomes `d`. Its token-embedding table is
  dropped (inputs are always embeddings).
- Timestamps are not used (HLLM has no time features); positions come from the decoder's own
  position encoding (RoPE for Llama).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mhr.errors import NotFoundError, UsageError
from mhr.models.item_encoder import POOLINGS

TINY = "tiny"
ADAPTERS = ("linear", "mlp")
ENCODE_BATCH = 64  # item texts per encoder call (sorted by length, so padding stays small)

# The from-scratch user decoder ("--user-llm tiny"); ignored when user_llm names a model.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"d": 64, "n_layers": 2, "n_heads": 2, "dropout": 0.1},
    "1": {"d": 128, "n_layers": 4, "n_heads": 4, "dropout": 0.1},
}


def _pretrained_config(user_llm: str):
    from transformers import AutoConfig

    path = Path(user_llm).expanduser()
    looks_like_path = user_llm.startswith((".", "/", "~")) or user_llm.count("/") != 1
    if not path.is_dir() and looks_like_path:
        raise NotFoundError(
            f"no user LLM at {user_llm!r}",
            hint="pass --user-llm tiny (a small decoder built from scratch), a local transformers "
            "model directory, or a hub name (org/model)",
        )
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else user_llm)
    except (OSError, ValueError) as e:
        raise NotFoundError(
            f"cannot load user LLM {user_llm!r}: {str(e).splitlines()[0]}",
            hint="pass a local model directory (with HF_HUB_OFFLINE=1 hub names must be in the HF cache)",
        ) from e


@dataclass(frozen=True)
class HLLMConfig:
    """Everything needed to rebuild an `HLLM` (its item-embedding buffer comes with the weights).

    d, n_layers, n_heads, n_kv_heads, intermediate, dropout shape the from-scratch user decoder
    (`user_llm == "tiny"`); for a named model `d` is read from its config and the rest is ignored
    except `dropout` (on the decoder's inputs). intermediate None = 4 d; n_kv_heads None = n_heads.
    item_dim is the item LLM's width (384 for all-MiniLM-L6-v2); item_embeddings_key records which
    `embed_items` artifact the buffer came from. train_item_llm fine-tunes the item LLM `item_llm`
    end to end, reading item texts cut to max_text_len tokens (unused by the frozen item LLM).
    """

    n_items: int
    max_len: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int | None = None
    intermediate: int | None = None
    dropout: float = 0.1
    user_llm: str = TINY
    item_dim: int = 384
    adapter: str = "mlp"
    item_llm: str = "minilm"
    pooling: str = "mean"
    item_embeddings_key: str | None = None
    train_item_llm: bool = False
    rope_theta: float = 10000.0
    max_text_len: int = 256

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise UsageError(f"HLLM needs n_items >= 1 and max_len >= 1 (got {self.n_items}, {self.max_len})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.adapter not in ADAPTERS:
            raise UsageError(f"unknown item adapter {self.adapter!r}", hint=f"choose one of {', '.join(ADAPTERS)}")
        if self.item_dim < 1:
            raise UsageError(f"item_dim must be >= 1, got {self.item_dim}")
        if self.pooling not in POOLINGS:
            raise UsageError(f"unknown pooling {self.pooling!r}", hint=f"choose one of {', '.join(POOLINGS)}")
        if self.train_item_llm and self.max_text_len < 2:
            raise UsageError(f"--max-text-len must be >= 2, got {self.max_text_len}")
        if self.user_llm == TINY:
            if self.d < 1 or self.n_layers < 1 or self.n_heads < 1 or self.d % self.n_heads:
                raise UsageError(
                    f"user decoder size out of range: d={self.d}, n_layers={self.n_layers}, n_heads={self.n_heads}",
                    hint="d must be a positive multiple of n_heads",
                )
            if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
                raise UsageError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        else:
            object.__setattr__(self, "d", int(_pretrained_config(self.user_llm).hidden_size))


def hllm_config(size: str, n_items: int, max_len: int, **overrides: Any) -> HLLMConfig:
    if size not in SIZES:
        raise UsageError(f"HLLM has no size {size!r}", hint=f"choose one of {', '.join(SIZES)}")
    return HLLMConfig(n_items=n_items, max_len=max_len, **{**SIZES[size], **overrides})


def _tiny_llama_config(config: HLLMConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1,  # never used: the decoder is fed inputs_embeds
        hidden_size=config.d,
        intermediate_size=config.intermediate or 4 * config.d,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads or config.n_heads,
        max_position_embeddings=max(config.max_len, 8),
        attention_dropout=config.dropout,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        use_cache=False,
    )


def build_user_llm(config: HLLMConfig, meta: bool = False) -> nn.Module:
    """The user decoder (base model, no LM head) with a 1-row frozen token-embedding stub.

    meta=True builds it on the meta device (shapes only, no weights read): for counting.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with torch.device("meta") if meta else nullcontext():
        if config.user_llm == TINY:
            from transformers import LlamaModel

            model = LlamaModel(_tiny_llama_config(config))
        elif meta:
            model = AutoModel.from_config(_pretrained_config(config.user_llm))
        else:
            path = Path(config.user_llm).expanduser()
            # fp32 master weights whatever the checkpoint's dtype; training autocasts on GPU
            model = AutoModel.from_pretrained(str(path) if path.is_dir() else config.user_llm, dtype=torch.float32)
        if getattr(model.config, "is_encoder_decoder", False):
            raise UsageError(f"user LLM {config.user_llm!r} is an encoder-decoder; pass a decoder-only model")
        # Inputs are always embeddings: drop the (possibly huge) token table so it is neither
        # trained nor saved; a frozen 1-row stub keeps get_input_embeddings() working.
        stub = nn.Embedding(1, model.config.hidden_size)
    stub.weight.requires_grad_(False)
    model.set_input_embeddings(stub)
    model.config.use_cache = False
    return model


def build_item_llm(config: HLLMConfig, meta: bool = False) -> tuple[Any, nn.Module]:
    """(tokenizer, encoder) of the fine-tuned item LLM: `config.item_llm`'s pretrained weights in
    fp32 (training autocasts on GPU), its pooler head dropped — no pooling reads it, so it would
    get no gradient (DistributedDataParallel wants every trainable parameter used).

    meta=True builds it on the meta device (shapes only, no weights read, no tokenizer): for counting.
    """
    from mhr.models.item_encoder import encoder_config, load_encoder

    if meta:
        from transformers import AutoModel

        with torch.device("meta"):
            tokenizer, model = None, AutoModel.from_config(encoder_config(config.item_llm))
    else:
        tokenizer, model = load_encoder(config.item_llm, "cpu")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if model.config.hidden_size != config.item_dim:
        raise UsageError(f"item LLM width {model.config.hidden_size} != item_dim={config.item_dim}")
    return tokenizer, model


class ItemAdapter(nn.Module):
    """Item LLM embedding [.., d_item] -> user LLM width [.., d]: linear, or Linear-GELU-Linear."""

    def __init__(self, d_item: int, d: int, kind: str) -> None:
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(d_item, d)
        else:
            self.net = nn.Sequential(nn.Linear(d_item, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d_item)  # encoders differ wildly in output scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(e))


class HLLM(nn.Module):
    """items [B, L], ts [B, L] -> user states h [B, L, d]; scored against `item_vectors()`.

    Right-padded with item 0 and causal: state t depends only on items at positions <= t.
    Frozen item LLM: built from `item_embeddings` [N + 1, d_item]. Fine-tuned
    (`config.train_item_llm`): from `item_texts` (N strings, item i at index i - 1). Either is
    left out when a run is rebuilt: `load_state_dict` fills it.
    """

    def __init__(self, config: HLLMConfig, item_embeddings: torch.Tensor | None = None,
                 item_texts: Sequence[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.trains_item_llm = config.train_item_llm
        if self.trains_item_llm:
            if item_embeddings is not None:
                raise UsageError("a fine-tuned item LLM encodes item texts itself, not cached embeddings")
            self._init_item_llm(item_texts)
        else:
            self._init_item_table(item_embeddings)
        self.adapter = ItemAdapter(config.item_dim, config.d, config.adapter)
        self.input_dropout = nn.Dropout(config.dropout)
        self.user_llm = build_user_llm(config)
        if self.user_llm.config.hidden_size != config.d:
            raise UsageError(f"user LLM width {self.user_llm.config.hidden_size} != d={config.d}")

    def _init_item_table(self, item_embeddings: torch.Tensor | None) -> None:
        config = self.config
        shape = (config.n_items + 1, config.item_dim)
        if item_embeddings is None:  # filled by load_state_dict when a run is rebuilt
            item_embeddings = torch.zeros(shape)
        if tuple(item_embeddings.shape) != shape:
            raise UsageError(
                f"item embeddings have shape {tuple(item_embeddings.shape)}, the model needs {shape}",
                hint="set n_items to the catalogue size (rows - 1) and item_dim to the item LLM's width",
            )
        table = item_embeddings.detach().float().clone()
        table[0] = 0
        self.register_buffer("item_text_embeddings", table)

    def _init_item_llm(self, item_texts: Sequence[str] | None) -> None:
        from mhr.models.item_encoder import embedding_token, tokenize_texts

        config = self.config
        tokenizer, self.item_llm = build_item_llm(config)
        width = config.max_text_len - (config.pooling == "token")
        ids = torch.zeros(config.n_items + 1, width, dtype=torch.int32)  # row 0: padding, never encoded
        lengths = torch.zeros(config.n_items + 1, dtype=torch.int32)
        if item_texts is not None:
            if len(item_texts) != config.n_items:
                raise UsageError(f"{len(item_texts)} item texts for a catalogue of {config.n_items} items")
            ids[1:], lengths[1:] = tokenize_texts(item_texts, tokenizer, config.max_text_len, config.pooling)
        self.register_buffer("item_token_ids", ids)
        self.register_buffer("item_token_lengths", lengths)
        if config.pooling == "token":  # HLLM's learned [ITEM] token, started at the neutral mean
            self.item_token = nn.Parameter(embedding_token(self.item_llm))
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # (slot [N + 1], embeddings [n, d_item])
        self._catalogue: torch.Tensor | None = None  # eval-mode embeddings [N + 1, d_item], no grad

    # -- the fine-tuned item LLM ------------------------------------------------------------------

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Item LLM embeddings [len(ids), d_item] of items `ids` (all != 0), in length-sorted
        batches; with gradient when grad is enabled."""
        from mhr.models.item_encoder import pool_states

        lengths = self.item_token_lengths[ids].long()
        order = torch.argsort(lengths, descending=True, stable=True)
        token = getattr(self, "item_token", None)
        parts = []
        for start in range(0, len(ids), ENCODE_BATCH):
            rows = order[start : start + ENCODE_BATCH]
            width = int(lengths[rows[0]])
            input_ids = self.item_token_ids[ids[rows], :width].long()
            mask = (torch.arange(width, device=ids.device) < lengths[rows].unsqueeze(1)).long()
            parts.append(pool_states(self.item_llm, input_ids, mask, self.config.pooling, token).float())
        if not parts:
            return torch.zeros(0, self.config.item_dim, device=ids.device)
        return torch.cat(parts).index_select(0, torch.argsort(order))

    def _catalogue_embeddings(self) -> torch.Tensor:
        """[N + 1, d_item], row 0 = 0: cached in eval mode; with gradient in training mode."""
        if self.training:
            return self._padded(self._encode(self._all_ids()))
        cache = self._catalogue
        if cache is None or cache.device != self.item_token_ids.device:
            with torch.no_grad():
                cache = self._catalogue = self._padded(self._encode(self._all_ids()))
        return cache

    def _all_ids(self) -> torch.Tensor:
        return torch.arange(1, self.config.n_items + 1, device=self.item_token_ids.device)

    @staticmethod
    def _padded(emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([emb.new_zeros(1, emb.shape[1]), emb])

    def _slots(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [N + 1]: row of each item in emb, -1 if absent; emb [n, d_item]) for unique ids."""
        ids = ids[ids != 0].long()
        slot = torch.full((self.config.n_items + 1,), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)
        return slot, self._encode(ids)

    @contextmanager
    def encoding(self, ids: torch.Tensor) -> Iterator[None]:
        """One training step of the fine-tuned item LLM: encode items `ids` (unique; 0 ignored) once,
        with gradient; `forward` and `item_vectors()` read them until the block ends."""
        if not self.trains_item_llm:
            yield
            return
        self._catalogue = None  # the weights are about to change
        self._step = self._slots(ids)
        try:
            yield
        finally:
            self._step = None

    def train(self, mode: bool = True) -> HLLM:
        if mode and self.trains_item_llm:
            self._catalogue = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        if self.trains_item_llm:
            self._catalogue = None
        super()._load_from_state_dict(*args, **kwargs)

    def _item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Item LLM embeddings [..., d_item] of item ids [...] (0 -> zeros)."""
        if not self.trains_item_llm:
            return self.item_text_embeddings[ids]
        if self._step is not None:
            slot, emb = self._step
            if bool(((slot[ids] < 0) & (ids != 0)).any()):
                raise RuntimeError("an item of the batch was not encoded for this step (see HLLM.encoding)")
        elif not self.training:
            return self._catalogue_embeddings()[ids]
        else:
            slot, emb = self._slots(torch.unique(ids))
        return self._padded(emb)[slot[ids] + 1]  # slot -1 (item 0) -> the zero row

    # -- the model ----------------------------------------------------------------------------

    def _project(self, e: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter(e) * (ids != 0).unsqueeze(-1).to(e.dtype)

    def item_vectors(self) -> torch.Tensor:
        """adapter(E): [n_items + 1, d], row 0 (padding) = 0. Cold items included. Inside a
        fine-tuning step (`encoding`) only the step's rows are filled (with gradient), the rest is 0."""
        n = self.config.n_items + 1
        if not self.trains_item_llm:
            ids = torch.arange(n, device=self.item_text_embeddings.device)
            return self._project(self.item_text_embeddings, ids)
        if self._step is not None:
            slot, emb = self._step
            ids = (slot >= 0).nonzero(as_tuple=True)[0]
            rows = self._project(emb[slot[ids]], ids)
            return rows.new_zeros(n, rows.shape[1]).index_put((ids,), rows)
        ids = torch.arange(n, device=self.item_token_ids.device)
        return self._project(self._catalogue_embeddings(), ids)

    def forward(self, items: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """items [B, L] (0 = padding), ts [B, L] (unused) -> h [B, L, d]."""
        _, seq = items.shape
        if seq > self.config.max_len:
            raise UsageError(
                f"sequence length {seq} exceeds the model's max_len {self.config.max_len}",
                hint="cut sequences to the context length the model was built for",
            )
        valid = items != 0
        # Project only the items in the batch: the loss computes the full table once itself.
        x = self.input_dropout(self._project(self._item_embeddings(items), items))
        out = self.user_llm(inputs_embeds=x, attention_mask=valid.long(), use_cache=False)
        return out.last_hidden_state


def _user_llm_counts(config: HLLMConfig) -> tuple[int, int]:
    """(trainable, frozen) parameters of the user decoder, counted on the meta device."""
    model = build_user_llm(config, meta=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def estimate_params(config: HLLMConfig) -> int:
    """Exact parameter count of `HLLM(config)` (buffers excluded) without building its weights."""
    d, di = config.d, config.item_dim
    adapter = 2 * di + ((di + 1) * d if config.adapter == "linear" else (di + 1) * 2 * d + (2 * d + 1) * d)
    trainable, frozen = _user_llm_counts(config)
    item_llm = 0
    if config.train_item_llm:
        item_llm = sum(p.numel() for p in build_item_llm(config, meta=True)[1].parameters())
        item_llm += di if config.pooling == "token" else 0
    return adapter + trainable + frozen + item_llm


def estimate_memory_bytes(config: HLLMConfig, batch: int, seq_len: int, bytes_per_value: int = 4) -> int:
    """Rough peak training memory: fp32 weights + grads + AdamW moments (16 B a parameter), the
    frozen item table, the projected item table and its gradient, and activations kept for
    backward (about 12 [B, L, d] tensors, 3 [B, L, intermediate] and 2 [B, H, L, L] maps a layer).
    For a named user LLM, layer count, heads and intermediate size are read from its config.
    A fine-tuned item LLM adds its token table and the activations of encoding a step's items,
    taken as min(N, 2 B L) texts (inputs and next-item targets; negatives and further horizon
    targets mostly repeat them) of max_text_len tokens, counted like the user LLM's layers.
    """
    if config.user_llm == TINY:
        n_layers, heads, inter = config.n_layers, config.n_heads, config.intermediate or 4 * config.d
    else:
        c = _pretrained_config(config.user_llm)
        n_layers, heads = c.num_hidden_layers, c.num_attention_heads
        inter = getattr(c, "intermediate_size", 4 * config.d)
    d, n = config.d, config.n_items + 1
    weights = 16 * estimate_params(config)
    table = n * config.item_dim * 4 + n * (2 * d + d) * 2 * bytes_per_value
    per_layer = batch * seq_len * (12 * d + 3 * inter) + 2 * batch * heads * seq_len * seq_len
    activations = (n_layers * per_layer + batch * seq_len * (config.item_dim + 4 * d)) * bytes_per_value
    if config.train_item_llm:
        from mhr.models.item_encoder import encoder_config

        c = encoder_config(config.item_llm)
        texts, t = min(n - 1, 2 * batch * seq_len), config.max_text_len
        inter = getattr(c, "intermediate_size", 4 * config.item_dim)
        per_text = c.num_hidden_layers * (t * (12 * config.item_dim + 3 * inter) + 2 * c.num_attention_heads * t * t)
        table += n * t * 4  # the token ids (the eval-mode catalogue stands in for the frozen table)
        activations += texts * per_text * bytes_per_value
    return weights + table + activations
