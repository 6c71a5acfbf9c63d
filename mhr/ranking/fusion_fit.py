"""Fitted fusions (`learned`, `invvar`): their per-head parameters fitted on a run's VALIDATION split,
never the test split, and cached per run in `runs/<name>/eval/fusion/<kind>-<key12>.json`.

A fit is a deterministic function of the run and the fit settings (`mhr.ranking.fusion.fit_settings`),
so its key is `stage_key("fusion", settings, {"run": run key})`. `mhr eval` and `mhr recommend` (and
the service) both read fits through `load_or_fit_fusion`, so they rank alike. The fusion math itself
is `mhr.ranking.fusion` (pure, no files).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mhr.cache import stage_key, write_json
from mhr.ranking import fusion as fusion_mod
from mhr.ranking.fusion import FusionFit
from mhr.ranking.inference import history_mask, iter_queries
from mhr.training.runs import LoadedRun
from mhr.windows import sample_rows

__all__ = ["fit_fusion", "fusion_key", "fusion_path", "load_or_fit_fusion", "subsample"]


def fusion_key(run: LoadedRun, kind: str) -> str:
    return stage_key("fusion", fusion_mod.fit_settings(kind), {"run": run.config["key"]})


def subsample(n: int, cap: int) -> np.ndarray:
    """All of 0..n-1, or a sorted seeded sample of `cap` of them (`windows.sample_rows`)."""
    return sample_rows(n, cap, fusion_mod.FIT_SEED)


def fit_fusion(run: LoadedRun, kind: str, device: str = "cpu") -> FusionFit:
    """Fit a fusion's per-head parameters on the run's VALIDATION split (pure: no files)."""
    key = fusion_key(run, kind)
    names = run.layout.names
    if run.layout.n_heads == 1:
        fit = fusion_mod.identity_fit(kind, names, note="one head: plain scoring, nothing to fit")
        return replace(fit, key=key)
    split = run.windows.read_split("valid")
    n_users = len(split["user"])
    model, omega = run.model, run.compat.omega.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            item_vecs = model.item_vectors().float()
        if kind == "invvar":
            rows = subsample(n_users, fusion_mod.VAR_MAX_USERS)
            batches = ((q, heads) for _, q, heads in iter_queries(model, run.compat, split, rows, device=device))
            var, counted = fusion_mod.head_variances(batches, item_vecs, model.scorer, omega)
            w = fusion_mod.inverse_variance_weights(var)
            info = {"users": int(len(rows)),
                    "variance": {n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, var, strict=True)}}
            return FusionFit(kind, names, weights=tuple(float(x) for x in w), info=info, key=key)
        # kept per fit user: scores of every eligible (head, item) pair, and [N+1] count/mask rows
        per_user = int(omega[:, 1:].sum()) + 2 * int(omega.shape[1])
        cap = max(fusion_mod.FIT_MIN_USERS, fusion_mod.FIT_MAX_ELEMENTS // max(1, per_user))
        rows = subsample(n_users, cap)
        parts = list(iter_queries(model, run.compat, split, rows, device=device))
        if parts:
            q = torch.cat([p[1] for p in parts])
            heads = torch.cat([p[2] for p in parts])
        else:
            q = torch.zeros(0, run.layout.n_heads, item_vecs.shape[1])
            heads = torch.zeros(0, run.layout.n_heads, dtype=torch.bool)
        n_items = int(item_vecs.shape[0] - 1)
        exclude = history_mask(split, rows, n_items)
        scale, offset, info = fusion_mod.fit_calibration(
            q, item_vecs, model.scorer, omega, split["targets"][rows], exclude, heads
        )
        info = {**info, "sampled_users": int(len(rows)), "valid_users": int(n_users)}
        return FusionFit(kind, names, scale=tuple(float(x) for x in scale),
                         offset=tuple(float(x) for x in offset), info=info, key=key)
    finally:
        model.train(was_training)


def fusion_path(run: LoadedRun, kind: str) -> Path:
    return run.path / "eval" / "fusion" / f"{kind}-{fusion_key(run, kind)[:12]}.json"


def load_or_fit_fusion(run: LoadedRun, kind: str, force: bool = False, device: str = "cpu") -> FusionFit:
    """The run's fitted fusion, read back from its cache file when the key matches, else fitted
    and written (atomically)."""
    key = fusion_key(run, kind)
    path = fusion_path(run, kind)
    if not force:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return FusionFit.from_json(data)
        except (OSError, ValueError, KeyError):
            pass
    fit = fit_fusion(run, kind, device=device)
    write_json(path, fit.as_json(), indent=1, sort_keys=True)
    return fit
