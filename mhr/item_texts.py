"""The item-texts stage: each item of the store as one text, and the texts' cached embeddings (HLLM).

`item_texts(con)` renders each item of the store as one string, e.g.
`"title: Toy Story (1995). tags: Animation; Comedy. brand: Pixar"`, from the `items` columns
(`title`, `text`, `tags`, `raw_id`) and the fields of the `attrs` JSON (any other name).

`embed_items(dataset, model, ...)` is a cached stage: it encodes every item's text with a
`transformers` encoder (`mhr.models.item_encoder`) and writes
`<dataset>/item_embeddings/<key12>/embeddings.safetensors` (tensor `embeddings`, float32 [N + 1, d_item],
row 0 = padding = zeros) plus `manifest.json`. The key covers the model's identity (its path or name,
a hash of its `config.json` and the sizes of its weight files), the text settings, the pooling and the
store's data key, so a rerun with the same inputs is a no-op and any change re-encodes.

`mhr train` runs it first for a backbone that reads item texts (`Backbone.reads_item_texts`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mhr.cache import build_artifact, read_manifest, stage_key
from mhr.console import progress
from mhr.errors import NotFoundError, UsageError
from mhr.models import item_encoder
from mhr.models.item_encoder import DEFAULT_MODEL, POOLINGS
from mhr.store import connect, data_key
from mhr.workspace import Dataset

STAGE = "item_embeddings"
DEFAULT_TEXT_COLS = ("title", "tags", "text")
ITEM_COLUMNS = ("title", "text", "tags", "raw_id")
EMBEDDINGS_FILE = "embeddings.safetensors"


# ---------------------------------------------------------------------------------------------
# text


def _render(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(s for s in (_render(v) for v in value) if s)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_render(v)}" for k, v in value.items() if _render(v))
    return str(value).strip()


def item_texts(
    con, text_cols: Sequence[str] = DEFAULT_TEXT_COLS, max_chars: int | None = 2000
) -> list[str]:
    """One string per item, index i = item_id i + 1 (item ids are 1..N).

    Each non-empty field becomes `"<name>: <value>"`, joined by ". "; tags are joined by "; ".
    A name that is not an `items` column is looked up in the item's `attrs` JSON; a name found in
    neither place for any item is a `UsageError`. Texts are cut to `max_chars` characters.
    """
    if not text_cols:
        raise UsageError("no text columns given", hint=f"use e.g. {','.join(DEFAULT_TEXT_COLS)}")
    rows = con.execute(
        "SELECT item_id, raw_id, title, text, tags, attrs FROM items ORDER BY item_id"
    ).fetchall()
    for expected, row in enumerate(rows, start=1):
        if row[0] != expected:
            raise UsageError(f"items table ids are not dense 1..N (found {row[0]} at {expected})")
    seen: set[str] = set()
    texts = []
    for _, raw_id, title, text, tags, attrs in rows:
        cols = {"raw_id": raw_id, "title": title, "text": text, "tags": tags}
        try:
            extra = json.loads(attrs) if attrs else {}
        except json.JSONDecodeError:
            extra = {}
        extra = extra if isinstance(extra, dict) else {}
        parts = []
        for name in text_cols:
            if name in ITEM_COLUMNS:
                value = cols[name]
                seen.add(name)
            else:
                value = extra.get(name)
                if name in extra:
                    seen.add(name)
            rendered = _render(value)
            if rendered:
                parts.append(f"{name}: {rendered}")
        joined = ". ".join(parts)
        texts.append(joined[:max_chars] if max_chars else joined)
    missing = [c for c in text_cols if c not in seen]
    if missing and rows:
        keys = sorted({k for r in rows[:1000] for k in _attr_keys(r[5])})
        raise UsageError(
            f"text column(s) {missing} are neither item columns nor attrs fields of any item",
            hint=f"item columns: {', '.join(ITEM_COLUMNS)}; attrs fields: {', '.join(keys) or 'none'}",
        )
    return texts


def _attr_keys(attrs: str | None) -> list[str]:
    try:
        value = json.loads(attrs) if attrs else {}
    except json.JSONDecodeError:
        return []
    return list(value) if isinstance(value, dict) else []


# ---------------------------------------------------------------------------------------------
# the stage


def embeddings_dir(dataset: Dataset) -> Path:
    return dataset.dir / "item_embeddings"


def embed_items(
    dataset: Dataset,
    model: str | None = DEFAULT_MODEL,
    text_cols: Sequence[str] = DEFAULT_TEXT_COLS,
    max_text_len: int = 256,
    pooling: str = "mean",
    batch_size: int = 64,
    force: bool = False,
    device: str = "cpu",
    max_chars: int = 2000,
    show_progress: bool = True,
) -> tuple[str, Path]:
    """Encode every item's text once; returns (key, artifact directory). Cached by key."""
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}", hint=f"choose one of {', '.join(POOLINGS)}")
    if max_text_len < 2 or batch_size < 1:
        raise UsageError("--max-text-len must be >= 2 and the batch size >= 1")
    con = connect(dataset.require().store_path, read_only=True)
    try:
        texts = item_texts(con, text_cols, max_chars)
        inputs = {"data": data_key(con)}
    finally:
        con.close()
    params = {
        "model": item_encoder.model_identity(model),
        "text_cols": list(text_cols),
        "max_text_len": max_text_len,
        "max_chars": max_chars,
        "pooling": pooling,
    }
    key = stage_key(STAGE, params, inputs)
    final = embeddings_dir(dataset) / key[:12]

    def build(tmp: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        tokenizer, encoder = item_encoder.load_encoder(model, device)
        t0 = time.time()
        with progress() as bar:
            task = bar.add_task("item embeddings", total=len(texts), info="")
            vecs = item_encoder.encode_texts(
                texts, tokenizer, encoder, max_text_len, pooling, batch_size,
                on_batch=lambda n: bar.advance(task, n) if show_progress else None,
            )
        seconds = time.time() - t0
        table = torch.cat([torch.zeros(1, vecs.shape[1]), vecs])  # row 0 = padding
        save_file({"embeddings": table.contiguous()}, tmp / EMBEDDINGS_FILE)
        return {"n_items": len(texts), "dim": int(vecs.shape[1]), "seconds": round(seconds, 3),
                "items_per_s": round(len(texts) / max(seconds, 1e-9), 1)}

    key, _ = build_artifact(final, STAGE, params, inputs, build, force=force)
    return key, final


def load_item_embeddings(dataset: Dataset, key: str) -> torch.Tensor:
    """The float32 [N + 1, d_item] table of a built `embed_items` artifact (by full key or prefix)."""
    from safetensors.torch import load_file

    path = embeddings_dir(dataset) / key[:12]
    manifest = read_manifest(path)
    if manifest is None or not manifest["key"].startswith(key):
        raise NotFoundError(
            f"no item embeddings {key[:12]} in {embeddings_dir(dataset)}",
            hint="build them with embed_items (mhr train --backbone hllm does this first)",
        )
    return load_file(path / EMBEDDINGS_FILE)["embeddings"]
