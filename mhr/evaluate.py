"""`mhr eval`: full-catalogue ranking of a split and every metric of DESIGN §5.

The stage is a pure function of (run, evaluation parameters) → `runs/<name>/eval/<key12>.json`;
its key covers the run's key (and the baseline's), so a retrained run is re-evaluated and an
unchanged one is read back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhr.cache import canonical_json, stage_key
from mhr.errors import UsageError
from mhr.inference import Ranking, rank_split
from mhr.metrics import coverage, entropy_at_k, ndcg_at_k, new_interest_mask, recall_at_k
from mhr.priors.spec import PriorSpec
from mhr.train import LoadedRun, load_run
from mhr.workspace import Dataset

FUSIONS = ("max", "avg")
EVAL_FORMAT = 1


@dataclass(frozen=True)
class EvalParams:
    fusion: str = "max"
    ks: tuple[int, ...] = (5, 10, 50, 200)
    horizons: tuple[int, ...] = ()  # () = 1, τ/2, τ
    split: str = "test"
    keep_history: bool = False
    oracle_event: bool = False
    baseline: str | None = None
    entropy_prior: str | None = None  # item-kind prior whose categories H@K counts; default: first item prior

    def check(self) -> None:
        if self.fusion not in FUSIONS:
            raise UsageError(f"unknown fusion {self.fusion!r}", hint=f"use one of {', '.join(FUSIONS)}")
        if self.split not in ("valid", "test"):
            raise UsageError(f"unknown split {self.split!r}", hint="use valid or test")
        if not self.ks or min(self.ks) < 1:
            raise UsageError("--k needs positive cut-offs, e.g. 5,10,50,200")


def _horizons(params: EvalParams, tau: int) -> list[int]:
    hs = list(params.horizons) or sorted({1, max(1, tau // 2), tau})
    bad = [h for h in hs if h < 1 or h > tau]
    if bad:
        raise UsageError(f"--horizons {bad} outside 1..{tau} (the windows' τ)")
    return hs


def _category_prior(run: LoadedRun, dataset: Dataset, name: str | None) -> PriorSpec | None:
    """The item categories that entropy and new-interest are counted over."""
    from mhr.priors.spec import load_prior
    from mhr.store import connect

    if name is None:
        for spec in run.priors:
            if spec.kind == "item":
                return spec
        name = "item"
    con = connect(dataset.store_path, read_only=True)
    try:
        exists = con.execute("SELECT count(*) FROM priors WHERE prior = ? AND kind IN ('item', 'graph')",
                             [name]).fetchone()[0]
        return load_prior(con, name) if exists else None
    finally:
        con.close()


def _oracle_event_mask(run: LoadedRun, split: dict[str, np.ndarray]) -> torch.Tensor | None:
    """ORACLE: heads usable per user restricted to the true event type of the first target."""
    levels = [i for i, s in enumerate(run.priors) if s.kind == "event"]
    if not levels:
        raise UsageError("--oracle-event needs a run with an event prior")
    level = levels[0]
    spec = run.priors[level]
    vocab = run.windows.event_vocab
    first_event = split["target_events"][:, 0]
    true_group = np.array(
        [spec.event_groups.get(vocab[c] if c > 0 else None, -1) for c in first_event], dtype=np.int64
    )
    mask = np.ones((len(first_event), run.layout.n_heads), dtype=bool)
    for k, leaf in enumerate(run.layout.leaves):
        for p, g in leaf:
            if p == level:
                mask[:, k] &= true_group == g
    return torch.from_numpy(mask)


def _metrics(ranking: Ranking, targets: np.ndarray, ks: list[int], horizons: list[int],
             rows: np.ndarray | None = None) -> dict[str, float]:
    items = ranking.items if rows is None else ranking.items[rows]
    tg = targets if rows is None else targets[rows]
    out: dict[str, float] = {"users": int(len(tg))}
    if len(tg) == 0:
        return out
    for h in horizons:
        for k in ks:
            out[f"recall@{k}/h{h}"] = float(np.mean(recall_at_k(items, tg[:, :h], k)))
            out[f"ndcg@{k}/h{h}"] = float(np.mean(ndcg_at_k(items, tg[:, :h], k)))
    return out


def evaluate_run(run: LoadedRun, dataset: Dataset, params: EvalParams,
                 baseline: LoadedRun | None = None, device: str = "cpu") -> dict[str, Any]:
    """Every metric for one run on one split (pure: no files written)."""
    params.check()
    tau = int(run.windows.params["horizon"])
    hs = _horizons(params, tau)
    ks = sorted(set(params.ks))
    kmax = max(ks)
    split = run.windows.read_split(params.split)
    targets = split["targets"]
    user_mask = _oracle_event_mask(run, split) if params.oracle_event else None
    ranking = rank_split(run.model, run.compat, split, k=kmax, fusion=params.fusion,
                         exclude_history=not params.keep_history, device=device, user_heads=user_mask)
    n_items = int(run.compat.omega.shape[1] - 1)
    result: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "run": run.name,
        "run_key": run.config["key"],
        "split": params.split,
        "params": _jsonable(params),
        "oracle": bool(params.oracle_event),
        "horizons": hs,
        "ks": ks,
        "metrics": _metrics(ranking, targets, ks, hs),
        "coverage": {f"@{k}": float(coverage(ranking.items, n_items, k)) for k in ks},
        "heads": list(run.layout.names),
    }
    cat = _category_prior(run, dataset, params.entropy_prior)
    if cat is not None:
        groups = cat.item_groups
        result["entropy"] = {
            "prior": cat.name,
            **{f"H@{k}": float(np.mean(entropy_at_k(ranking.items, groups, k))) for k in ks},
        }
        new = new_interest_mask(split["history_ptr"], split["history_items"], targets, groups)
        rows = np.flatnonzero(new)
        result["new_interest"] = {"prior": cat.name, "share": float(new.mean()),
                                  "metrics": _metrics(ranking, targets, ks, hs, rows)}
        if baseline is not None:
            base_rank = rank_split(baseline.model, baseline.compat, split, k=kmax, fusion=params.fusion,
                                   exclude_history=not params.keep_history, device=device)
            base = _metrics(base_rank, targets, ks, hs, rows)
            mine = result["new_interest"]["metrics"]
            result["new_interest"]["baseline"] = {"run": baseline.name, "metrics": base}
            result["new_interest"]["boost"] = {
                m: (mine[m] - base[m]) / base[m] if base.get(m) else None
                for m in mine if m != "users"
            }
    # per user group: every user-kind prior of the run, else every user prior in the store
    result["user_groups"] = _per_user_group(run, dataset, ranking, targets, split["user"], hs[-1])
    if params.fusion == "max":
        top10 = ranking.winners[:, : min(10, kmax)]
        counts = np.bincount(top10[top10 >= 0].ravel(), minlength=run.layout.n_heads)
        total = max(1, int(counts.sum()))
        result["head_usage@10"] = {run.layout.names[i]: counts[i] / total for i in range(len(counts))}
    return result


def _per_user_group(run: LoadedRun, dataset: Dataset, ranking: Ranking, targets: np.ndarray,
                    users: np.ndarray, h: int) -> dict[str, Any]:
    from mhr.priors.spec import load_prior
    from mhr.store import connect

    con = connect(dataset.store_path, read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT prior FROM priors WHERE kind = 'user' ORDER BY prior").fetchall()]
        specs = [load_prior(con, n) for n in names]
    finally:
        con.close()
    out: dict[str, Any] = {}
    for spec in specs:
        groups = spec.user_groups[users]
        per = {}
        for g, gname in enumerate(spec.group_names):
            rows = np.flatnonzero(groups == g)
            per[gname] = _metrics(ranking, targets, [10], [h], rows)
        out[spec.name] = per
    return out


def _jsonable(params: EvalParams) -> dict[str, Any]:
    d = asdict(params)
    d["ks"] = list(params.ks)
    d["horizons"] = list(params.horizons)
    return d


def eval_key(run: LoadedRun, params: EvalParams, baseline: LoadedRun | None) -> str:
    inputs = {"run": run.config["key"]}
    if baseline is not None:
        inputs["baseline"] = baseline.config["key"]
    return stage_key("eval", _jsonable(params), inputs)


def read_eval(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if data.get("key") == key and data.get("format") == EVAL_FORMAT else None
    except (OSError, ValueError):
        return None


def evaluate(dataset: Dataset, run_name: str, params: EvalParams, force: bool = False,
             device: str = "cpu") -> tuple[Path, dict[str, Any], bool]:
    """The cached stage: returns (path of the JSON, result, cached)."""
    params.check()
    run = load_run(dataset, run_name, device=device)
    baseline = load_run(dataset, params.baseline, device=device) if params.baseline else None
    if baseline is not None and baseline.windows.key != run.windows.key:
        raise UsageError(
            f"baseline {baseline.name!r} was trained on other windows than {run.name!r}",
            hint="compare runs trained on the same windows",
        )
    key = eval_key(run, params, baseline)
    path = run.path / "eval" / f"{key[:12]}.json"
    if not force and (cached := read_eval(path, key)) is not None:
        return path, cached, True
    result = evaluate_run(run, dataset, params, baseline, device=device)
    result["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path, result, False


def summary_line(result: dict[str, Any]) -> str:
    """A short digest used in logs."""
    m = result["metrics"]
    h = result["horizons"][-1]
    return canonical_json({k: round(v, 4) for k, v in m.items() if k.startswith(("ndcg@10/", "recall@10/")) and k.endswith(f"h{h}")})
