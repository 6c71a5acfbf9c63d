"""`mhr eval`: full-catalogue ranking of a split and every metric of the evaluation protocol
(docs/ARCHITECTURE.md, "Evaluation protocol").

The stage is a pure function of (run, evaluation parameters) → `runs/<name>/eval/<key12>.json`;
its key covers the run's key (and the baseline's), so a retrained run is re-evaluated and an
unchanged one is read back.

Fusion: `max` and `avg` are the paper's; `learned` and `invvar` (`mhr.ranking.fusion`) have per-head
parameters fitted on the VALIDATION split, never the test split, whatever split is evaluated. A fit
is a deterministic function of the run and the fit settings (`mhr.ranking.fusion.fit_settings`), cached in
`runs/<name>/eval/fusion/<kind>-<key12>.json` and copied into the eval JSON under "fusion"; the
eval key covers the fit key.

Horizons: metrics at horizon h score the first h targets of each user. The windows hold H targets
per user (H = τ, or `mhr windows build --holdout H`), so h runs over 1..H; a model trained at τ can
be scored beyond it when H > τ (paper Table 7).

Metric means leave out users without a target (`has_targets`); an empty subset is reported with
`users = 0` and no metric keys. Subsets: `new_interest` (targets hold a category absent from the
history) and `cold` (targets restricted to items that never occur in the training windows).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from mhr.cache import canonical_json, stage_key, write_json
from mhr.errors import UsageError, refuse_non_finite
from mhr.priors.spec import PriorSpec
from mhr.ranking import fusion as fusion_mod
from mhr.ranking.diversity import greedy_diverse
from mhr.ranking.fusion import FITTED, FUSIONS, FusionFit
from mhr.ranking.inference import Ranking, history_mask, iter_queries, rank_split
from mhr.ranking.metrics import (
    coverage,
    entropy_at_k,
    has_targets,
    masked_mean,
    ndcg_at_k,
    new_interest_mask,
    recall_at_k,
)
from mhr.training.train import LoadedRun, load_run
from mhr.windows import sample_rows, subset_split
from mhr.workspace import Dataset

EVAL_FORMAT = 2


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
    diversity: float = 0.0  # λ of ComiRec's greedy category-diversity re-ranking (0 = off)
    oracle_group: str | None = None  # ORACLE: rank only inside the first target's group(s) of this prior
    sample_users: int | None = None  # score a seeded sample of this many users of the split (None = all)

    def check(self) -> None:
        refuse_non_finite(self)
        if self.fusion not in FUSIONS:
            raise UsageError(f"unknown fusion {self.fusion!r}", hint=f"use one of {', '.join(FUSIONS)}")
        if self.fusion in FITTED and self.oracle_event:
            raise UsageError(f"--fusion {self.fusion} cannot be combined with --oracle-event",
                             hint="evaluate the oracle with max or avg fusion")
        if self.split not in ("valid", "test"):
            raise UsageError(f"unknown split {self.split!r}", hint="use valid or test")
        if not self.ks or min(self.ks) < 1:
            raise UsageError("--k needs positive cut-offs, e.g. 5,10,50,200")
        if self.oracle_group is not None and self.oracle_event:
            raise UsageError("--oracle-group and --oracle-event are two different oracles", hint="use one")
        if self.diversity < 0:
            raise UsageError("--diversity must be >= 0", hint="0 is the plain ranking; ComiRec used 0..1")
        if self.sample_users is not None and self.sample_users < 1:
            raise UsageError("--sample-users must be ≥ 1", hint="leave it out to score every user of the split")


def _horizons(params: EvalParams, tau: int, holdout: int | None = None) -> list[int]:
    """The horizons h to score: the first h of the H held-out targets (H = τ unless the windows were
    built with `--holdout`). Default 1, τ/2, τ (and H when H > τ); h outside 1..H is refused."""
    holdout = tau if holdout is None else holdout
    hs = list(params.horizons) or sorted({1, max(1, tau // 2), tau, holdout})
    bad = [h for h in hs if h < 1 or h > holdout]
    if bad:
        held = "the windows' τ" if holdout == tau else f"the windows' held-out targets, H = {holdout}; τ = {tau}"
        hint = (f"score h ≤ {holdout}, or train on windows built with `mhr windows build --horizon {tau} "
                f"--holdout {max(bad)}`" if max(bad) > holdout else "horizons count targets from 1")
        raise UsageError(f"--horizons {bad} outside 1..{holdout} ({held})", hint=hint)
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


def _oracle_group_items(run: LoadedRun, dataset: Dataset, prior: str, split: dict[str, np.ndarray]):
    """ORACLE: `rows -> bool [b, N+1]`, the items sharing a group of `prior` (item or graph kind) with
    the user's first target. Applied alike to head runs (where it routes each user to the target's
    heads) and to a plain backbone (the fair control: the same restriction, no heads)."""
    from mhr.priors.spec import load_prior
    from mhr.store import connect

    con = connect(dataset.store_path, read_only=True)
    try:
        exists = con.execute("SELECT kind FROM priors WHERE prior = ?", [prior]).fetchone()
        if exists is None or exists[0] not in ("item", "graph"):
            raise UsageError(f"--oracle-group needs an item or graph prior; {prior!r} is "
                             f"{'not built' if exists is None else 'a ' + exists[0] + ' prior'}",
                             hint="name one from `mhr priors list`")
        spec = load_prior(con, prior)
    finally:
        con.close()
    n_items = int(run.compat.omega.shape[1] - 1)
    groups = torch.from_numpy(np.asarray(spec.item_groups, dtype=bool)[:, : n_items + 1].copy())  # [G, N+1]
    first = np.asarray(split["targets"])[:, 0].astype(np.int64)

    def allowed(rows: np.ndarray) -> torch.Tensor:
        mine = groups[:, torch.from_numpy(first[rows])].t()  # [b, G]: the first target's groups
        return (mine.float() @ groups.float()) > 0

    return allowed


def _metrics(ranking: Ranking, targets: np.ndarray, ks: list[int], horizons: list[int],
             rows: np.ndarray | None = None) -> dict[str, float]:
    """Recall/NDCG@K at each horizon, averaged over the users (of `rows`) with a target within that
    horizon; `users` counts users with any target. No such user: only `users = 0`."""
    items = ranking.items if rows is None else ranking.items[rows]
    tg = targets if rows is None else targets[rows]
    has = has_targets(tg) if len(tg) else np.zeros(0, dtype=bool)
    out: dict[str, float] = {"users": int(np.sum(has))}
    if not np.any(has):
        return out
    for h in horizons:
        mask = has_targets(tg[:, :h])
        for k in ks:
            out[f"recall@{k}/h{h}"] = masked_mean(recall_at_k(items, tg[:, :h], k), mask)
            out[f"ndcg@{k}/h{h}"] = masked_mean(ndcg_at_k(items, tg[:, :h], k), mask)
    return out


def train_items(run: LoadedRun) -> np.ndarray:
    """Sorted ids of the items that occur anywhere in the training windows (inputs or targets)."""
    col = run.windows.table("train").column("items")
    ids = np.unique(pc.list_flatten(col).to_numpy().astype(np.int64))
    return ids[ids > 0]


def cold_targets(targets: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Targets with every item seen in training replaced by 0 (padding): only cold targets remain."""
    targets = np.asarray(targets, dtype=np.int64)
    return np.where(np.isin(targets, seen), 0, targets)


def _cold(run: LoadedRun, ranking: Ranking, targets: np.ndarray, ks: list[int], hs: list[int],
          n_items: int) -> dict[str, Any]:
    seen = train_items(run)
    cold = cold_targets(targets, seen)
    users = has_targets(cold) if len(cold) else np.zeros(0, dtype=bool)
    rows = np.flatnonzero(users)
    return {
        "items": int(n_items - len(seen)),  # catalogue items never seen in training
        "targets": int((cold != 0).sum()),
        "users": int(len(rows)),
        "users_at": {f"h{h}": int(has_targets(cold[:, :h]).sum()) if len(cold) else 0 for h in hs},
        "metrics": _metrics(ranking, cold, ks, hs, rows),
    }


def _fusion_args(fusion: str, fit: FusionFit | None) -> dict[str, Any]:
    """rank_split keyword arguments of a fusion (a fitted one: avg with its per-head parameters)."""
    return fusion_mod.scoring_args(fusion, fit)


def evaluate_run(run: LoadedRun, dataset: Dataset, params: EvalParams,
                 baseline: LoadedRun | None = None, device: str = "cpu",
                 fit: FusionFit | None = None, baseline_fit: FusionFit | None = None) -> dict[str, Any]:
    """Every metric for one run on one split (pure: no files written).

    A fitted fusion (learned, invvar) uses `fit` / `baseline_fit` when given (cached by `evaluate`),
    else fits on the validation split here."""
    params.check()
    tau = int(run.windows.params["horizon"])
    hs = _horizons(params, tau, run.windows.holdout)
    ks = sorted(set(params.ks))
    kmax = min(max(ks), int(run.compat.omega.shape[1] - 1))  # no ranking is longer than the catalogue
    if params.fusion in FITTED and fit is None:
        fit = fit_fusion(run, params.fusion, device=device)
    split = run.windows.read_split(params.split)
    n_split = len(split["user"])
    if params.sample_users is not None and params.sample_users < n_split:
        split = subset_split(split, _subsample(n_split, params.sample_users))
    targets = split["targets"]
    user_mask = _oracle_event_mask(run, split) if params.oracle_event else None
    allowed = _oracle_group_items(run, dataset, params.oracle_group, split) if params.oracle_group else None
    n_items = int(run.compat.omega.shape[1] - 1)
    cat = _category_prior(run, dataset, params.entropy_prior)
    if params.diversity and cat is None:
        raise UsageError("--diversity needs item categories: no item prior in the run or the store",
                         hint="build one (`mhr priors build --kind item`) or name it with --entropy-prior")

    def ranked(r: LoadedRun, f: FusionFit | None, heads: torch.Tensor | None = None) -> Ranking:
        n_cand = min(n_items, 2 * kmax) if params.diversity else kmax
        out = rank_split(r.model, r.compat, split, k=n_cand, exclude_history=not params.keep_history,
                         device=device, user_heads=heads, allowed_items=allowed,
                         **_fusion_args(params.fusion, f))
        if not params.diversity:
            return out
        pick = greedy_diverse(out.items, out.scores, cat.item_groups, kmax, params.diversity)
        take = lambda a: np.take_along_axis(a, pick, axis=1)  # noqa: E731
        return Ranking(take(out.items), take(out.scores), take(out.winners))

    ranking = ranked(run, fit, user_mask)
    result: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "run": run.name,
        "run_key": run.config["key"],
        "split": params.split,
        "params": _jsonable(params),
        "oracle": bool(params.oracle_event or params.oracle_group),
        "split_users": n_split,
        "scored_users": int(len(split["user"])),
        "horizons": hs,
        "ks": ks,
        "metrics": _metrics(ranking, targets, ks, hs),
        "coverage": {f"@{k}": float(coverage(ranking.items, n_items, k)) for k in ks},
        "heads": list(run.layout.names),
    }
    if fit is not None:
        result["fusion"] = {**fit.as_json(), "fitted_on": "valid", "in_sample": params.split == "valid"}
    result["cold"] = _cold(run, ranking, targets, ks, hs, n_items)
    if cat is not None:
        groups = cat.item_groups
        result["entropy"] = {
            "prior": cat.name,
            **{f"H@{k}": float(np.mean(entropy_at_k(ranking.items, groups, k))) for k in ks},
        }
        result["target_groups"] = _per_target_group(cat, ranking, targets, ks, hs)
        new = new_interest_mask(split["history_ptr"], split["history_items"], targets, groups)
        rows = np.flatnonzero(new)
        result["new_interest"] = {"prior": cat.name, "share": float(new.mean()) if len(new) else 0.0,
                                  "metrics": _metrics(ranking, targets, ks, hs, rows)}
        if baseline is not None:
            if params.fusion in FITTED and baseline_fit is None:
                baseline_fit = fit_fusion(baseline, params.fusion, device=device)
            base_rank = ranked(baseline, baseline_fit)
            base = _metrics(base_rank, targets, ks, hs, rows)
            mine = result["new_interest"]["metrics"]
            result["new_interest"]["baseline"] = {"run": baseline.name, "metrics": base}
            result["new_interest"]["boost"] = {
                m: (mine[m] - base[m]) / base[m] if base.get(m) else None
                for m in mine if m != "users"
            }
            if baseline_fit is not None:
                result["new_interest"]["baseline"]["fusion"] = baseline_fit.as_json()
    # per user group: every user-kind prior of the run, else every user prior in the store
    result["user_groups"] = _per_user_group(run, dataset, ranking, targets, split["user"], hs[-1])
    if params.fusion == "max":
        top10 = ranking.winners[:, : min(10, kmax)]
        counts = np.bincount(top10[top10 >= 0].ravel(), minlength=run.layout.n_heads)
        total = max(1, int(counts.sum()))
        result["head_usage@10"] = {run.layout.names[i]: counts[i] / total for i in range(len(counts))}
    return result


def _per_target_group(cat: PriorSpec, ranking: Ranking, targets: np.ndarray, ks: list[int],
                      hs: list[int]) -> dict[str, Any]:
    """Metrics of the users whose first target is in each category of `cat` (multi-label: a user
    counts in each of its first target's categories), with the category's share of the catalogue
    and of those users: where a prior helps, it should show in its small categories."""
    first = targets[:, 0] if targets.shape[1] else np.zeros(len(targets), dtype=np.int64)
    member = cat.item_groups[:, first] & (first > 0)[None, :]  # [G, U]
    n_items = max(1, int(cat.item_groups[:, 1:].any(axis=0).sum()))
    n_users = max(1, int(member.any(axis=0).sum()))
    out: dict[str, Any] = {"prior": cat.name, "groups": {}}
    for g, name in enumerate(cat.group_names):
        rows = np.flatnonzero(member[g])
        out["groups"][name] = {
            "item_share": float(cat.item_groups[g, 1:].sum() / n_items),
            "user_share": float(len(rows) / n_users),
            "metrics": _metrics(ranking, targets, ks, hs, rows),
        }
    return out


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
    if not params.diversity:  # keys of evaluations without re-ranking stay as they were
        d.pop("diversity")
    if params.oracle_group is None:
        d.pop("oracle_group")
    if params.sample_users is None:
        d.pop("sample_users")
    return d


def eval_key(run: LoadedRun, params: EvalParams, baseline: LoadedRun | None) -> str:
    inputs = {"run": run.config["key"]}
    if baseline is not None:
        inputs["baseline"] = baseline.config["key"]
    if params.fusion in FITTED:  # the fitted weights: a function of the run and the fit settings
        inputs["fusion"] = fusion_key(run, params.fusion)
        if baseline is not None:
            inputs["baseline_fusion"] = fusion_key(baseline, params.fusion)
    return stage_key("eval", _jsonable(params), inputs)


# ---------------------------------------------------------------------------------------------
# fitted fusions (learned, invvar): fitted on the validation split, cached per run


def fusion_key(run: LoadedRun, kind: str) -> str:
    return stage_key("fusion", fusion_mod.fit_settings(kind), {"run": run.config["key"]})


def _subsample(n: int, cap: int) -> np.ndarray:
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
            rows = _subsample(n_users, fusion_mod.VAR_MAX_USERS)
            batches = ((q, heads) for _, q, heads in iter_queries(model, run.compat, split, rows, device=device))
            var, counted = fusion_mod.head_variances(batches, item_vecs, model.scorer, omega)
            w = fusion_mod.inverse_variance_weights(var)
            info = {"users": int(len(rows)),
                    "variance": {n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, var, strict=True)}}
            return FusionFit(kind, names, weights=tuple(float(x) for x in w), info=info, key=key)
        # kept per fit user: scores of every eligible (head, item) pair, and [N+1] count/mask rows
        per_user = int(omega[:, 1:].sum()) + 2 * int(omega.shape[1])
        cap = max(fusion_mod.FIT_MIN_USERS, fusion_mod.FIT_MAX_ELEMENTS // max(1, per_user))
        rows = _subsample(n_users, cap)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, fit.as_json(), indent=1, sort_keys=True)
    return fit


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
    fit = baseline_fit = None
    if params.fusion in FITTED:
        fit = load_or_fit_fusion(run, params.fusion, force=force, device=device)
        if baseline is not None:
            baseline_fit = load_or_fit_fusion(baseline, params.fusion, force=force, device=device)
    result = evaluate_run(run, dataset, params, baseline, device=device, fit=fit, baseline_fit=baseline_fit)
    result["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result, indent=1, sort_keys=True)
    return path, result, False


def summary_line(result: dict[str, Any]) -> str:
    """A short digest used in logs."""
    m = result["metrics"]
    h = result["horizons"][-1]
    return canonical_json({k: round(v, 4) for k, v in m.items() if k.startswith(("ndcg@10/", "recall@10/")) and k.endswith(f"h{h}")})
