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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from mhr.cache import stage_key, write_json
from mhr.errors import UsageError
from mhr.priors.kinds import EVENTS, ITEM_KINDS
from mhr.priors.spec import PriorSpec
from mhr.ranking import fusion as fusion_mod
from mhr.ranking.decode import item_prior, rank_objectives, resolve
from mhr.ranking.diversity import greedy_diverse
from mhr.ranking.eval_params import EvalParams
from mhr.ranking.fusion import FITTED, FusionFit
from mhr.ranking.fusion_fit import fit_fusion, fusion_key, load_or_fit_fusion, subsample
from mhr.ranking.inference import Ranking
from mhr.ranking.metrics import (
    category_coverage,
    coverage,
    entropy_at_k,
    group_share,
    has_targets,
    masked_mean,
    miscalibration,
    ndcg_at_k,
    new_interest_mask,
    quota_met,
    recall_at_k,
)
from mhr.ranking.objectives import resolve_group
from mhr.training.runs import LoadedRun, load_run
from mhr.windows import subset_split
from mhr.workspace import Dataset

EVAL_FORMAT = 2


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
        row = con.execute("SELECT kind FROM priors WHERE prior = ?", [name]).fetchone()
        return load_prior(con, name) if row is not None and row[0] in ITEM_KINDS else None
    finally:
        con.close()


def _oracle_event_mask(run: LoadedRun, split: dict[str, np.ndarray]) -> torch.Tensor | None:
    """ORACLE: heads usable per user restricted to the true event type of the first target."""
    levels = [i for i, s in enumerate(run.priors) if s.maps == EVENTS]
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
        if exists is None or exists[0] not in ITEM_KINDS:
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


@dataclass(frozen=True)
class _Setup:
    """What every ranking of one evaluation shares: the (sampled) split, cut-offs, oracles, categories."""

    split: dict[str, np.ndarray]
    n_split: int
    hs: list[int]
    ks: list[int]
    n_items: int
    cat: PriorSpec | None
    user_mask: torch.Tensor | None
    allowed: Any

    @property
    def kmax(self) -> int:
        return min(max(self.ks), self.n_items)  # no ranking is longer than the catalogue


def _setup(run: LoadedRun, dataset: Dataset, params: EvalParams) -> _Setup:
    tau = int(run.windows.params["horizon"])
    hs = _horizons(params, tau, run.windows.holdout)
    split = run.windows.read_split(params.split)
    n_split = len(split["user"])
    if params.sample_users is not None and params.sample_users < n_split:
        split = subset_split(split, subsample(n_split, params.sample_users))
    user_mask = _oracle_event_mask(run, split) if params.oracle_event else None
    allowed = _oracle_group_items(run, dataset, params.oracle_group, split) if params.oracle_group else None
    cat = _category_prior(run, dataset, params.entropy_prior)
    if params.diversity and cat is None:
        raise UsageError("--diversity needs item categories: no item prior in the run or the store",
                         hint="build one (`mhr priors build --kind item`) or name it with --entropy-prior")
    return _Setup(split, n_split, hs, sorted(set(params.ks)), int(run.compat.omega.shape[1] - 1), cat,
                  user_mask, allowed)


def _ranker(st: _Setup, params: EvalParams, dataset: Dataset, device: str):
    """`ranked(run, fit, heads) -> Ranking`: the top max(K) of a run under the evaluation's fusion,
    objectives (`mhr.ranking.decode.rank_objectives`, resolved per run) and diversity re-ranking."""
    objectives = params.objectives()

    def ranked(r: LoadedRun, f: FusionFit | None, heads: torch.Tensor | None = None) -> Ranking:
        resolved = resolve(objectives, r, dataset) if objectives.active else None
        n_cand = min(st.n_items, 2 * st.kmax) if params.diversity else st.kmax
        out = rank_objectives(r, st.split, n_cand, _fusion_args(params.fusion, f), resolved,
                              exclude_history=not params.keep_history, device=device, user_heads=heads,
                              allowed_items=st.allowed, cutoffs=st.ks)
        if not params.diversity:
            return out
        pick = greedy_diverse(out.items, out.scores, st.cat.item_groups, st.kmax, params.diversity)
        take = lambda a: np.take_along_axis(a, pick, axis=1)  # noqa: E731
        return Ranking(take(out.items), take(out.scores), take(out.winners))

    return ranked


def evaluate_run(run: LoadedRun, dataset: Dataset, params: EvalParams,
                 baseline: LoadedRun | None = None, device: str = "cpu",
                 fit: FusionFit | None = None, baseline_fit: FusionFit | None = None) -> dict[str, Any]:
    """Every metric for one run on one split (pure: no files written).

    A fitted fusion (learned, invvar) uses `fit` / `baseline_fit` when given (cached by `evaluate`),
    else fits on the validation split here."""
    params.check()
    if params.fusion in FITTED and fit is None:
        fit = fit_fusion(run, params.fusion, device=device)
    st = _setup(run, dataset, params)
    ranked = _ranker(st, params, dataset, device)
    ranking = ranked(run, fit, st.user_mask)
    targets, ks, hs = st.split["targets"], st.ks, st.hs
    result: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "run": run.name,
        "run_key": run.config["key"],
        "split": params.split,
        "params": _jsonable(params),
        "oracle": bool(params.oracle_event or params.oracle_group),
        "split_users": st.n_split,
        "scored_users": int(len(st.split["user"])),
        "horizons": hs,
        "ks": ks,
        "metrics": _metrics(ranking, targets, ks, hs),
        "coverage": {f"@{k}": float(coverage(ranking.items, st.n_items, k)) for k in ks},
        "heads": list(run.layout.names),
    }
    if fit is not None:
        result["fusion"] = {**fit.as_json(), "fitted_on": "valid", "in_sample": params.split == "valid"}
    result["cold"] = _cold(run, ranking, targets, ks, hs, st.n_items)
    if st.cat is not None:
        result.update(_category_results(st, ranking))
        if baseline is not None:
            if params.fusion in FITTED and baseline_fit is None:
                baseline_fit = fit_fusion(baseline, params.fusion, device=device)
            _baseline_boost(result["new_interest"], st, ranked(baseline, baseline_fit), baseline.name, baseline_fit)
    result.update(_objective_results(run, dataset, params, st, ranking))
    # per user group: every user-kind prior of the run, else every user prior in the store
    result["user_groups"] = _per_user_group(run, dataset, ranking, targets, st.split["user"], hs[-1])
    if params.fusion == "max":
        top10 = ranking.winners[:, : min(10, st.kmax)]
        counts = np.bincount(top10[top10 >= 0].ravel(), minlength=run.layout.n_heads)
        total = max(1, int(counts.sum()))
        result["head_usage@10"] = {run.layout.names[i]: counts[i] / total for i in range(len(counts))}
    return result


def _category_results(st: _Setup, ranking: Ranking) -> dict[str, Any]:
    """H@K, category coverage, C_KL@K, per-category and new-interest metrics over `st.cat`."""
    cat, split, targets, ks, hs = st.cat, st.split, st.split["targets"], st.ks, st.hs
    groups = cat.item_groups
    out: dict[str, Any] = {"entropy": {
        "prior": cat.name, **{f"H@{k}": float(np.mean(entropy_at_k(ranking.items, groups, k))) for k in ks}}}
    out["category_coverage"] = {
        "prior": cat.name, **{f"@{k}": float(np.mean(category_coverage(ranking.items, groups, k))) for k in ks}}
    out["c_kl"] = _c_kl(cat, split, ranking, ks)
    out["target_groups"] = _per_target_group(cat, ranking, targets, ks, hs)
    new = new_interest_mask(split["history_ptr"], split["history_items"], targets, groups)
    rows = np.flatnonzero(new)
    out["new_interest"] = {"prior": cat.name, "share": float(new.mean()) if len(new) else 0.0,
                           "metrics": _metrics(ranking, targets, ks, hs, rows)}
    return out


def _c_kl(spec: PriorSpec, split: dict[str, np.ndarray], ranking: Ranking, ks: list[int]) -> dict[str, Any]:
    """Steck's miscalibration C_KL@K over `spec`'s groups, averaged over users with a grouped history."""
    out: dict[str, Any] = {"prior": spec.name}
    for k in ks:
        values, defined = miscalibration(ranking.items, split["history_ptr"], split["history_items"],
                                         spec.item_groups, k)
        out[f"@{k}"] = float(values[defined].mean()) if defined.any() else None
    return out


def _baseline_boost(new_interest: dict[str, Any], st: _Setup, base_rank: Ranking, name: str,
                    baseline_fit: FusionFit | None) -> None:
    """The baseline's new-interest metrics beside the run's, and the relative boost."""
    rows = np.flatnonzero(new_interest_mask(st.split["history_ptr"], st.split["history_items"],
                                            st.split["targets"], st.cat.item_groups))
    base = _metrics(base_rank, st.split["targets"], st.ks, st.hs, rows)
    mine = new_interest["metrics"]
    new_interest["baseline"] = {"run": name, "metrics": base}
    new_interest["boost"] = {m: (mine[m] - base[m]) / base[m] if base.get(m) else None for m in mine if m != "users"}
    if baseline_fit is not None:
        new_interest["baseline"]["fusion"] = baseline_fit.as_json()


def _objective_results(run: LoadedRun, dataset: Dataset, params: EvalParams, st: _Setup,
                       ranking: Ranking) -> dict[str, Any]:
    """Per steered (boosted) group and K: mean exposure `share`, and `met` (users whose top K meets the quota);
    C_KL@K over the --calibrate prior (`c_kl`, in place of the one over --entropy-prior's categories)."""
    objectives = params.objectives()
    out: dict[str, Any] = {}
    n_cols = st.n_items + 1
    for flag, items in (("steer", objectives.steer), ("boost", objectives.boost)):
        for s in items:
            spec = item_prior(run, dataset, s.prior, f"--{flag}")
            member = spec.item_groups[resolve_group(s.group, spec.group_names, s.prior, f"--{flag}"), :n_cols]
            cells = {}
            for k in st.ks:
                cells[f"@{k}"] = {"share": float(np.mean(group_share(ranking.items, member, k)))}
                if flag == "steer":
                    cells[f"@{k}"] |= {"met": float(np.mean(quota_met(ranking.items, member, s.share, k))),
                                       "target": s.share}
            out.setdefault(flag, {})[s.text()] = cells
    if objectives.calibrate:
        out["c_kl"] = _c_kl(item_prior(run, dataset, objectives.calibrate, "--calibrate"), st.split,
                                  ranking, st.ks)
    return out


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
    objectives = params.objectives()
    d["steer"], d["boost"] = [t.text() for t in objectives.steer], [t.text() for t in objectives.boost]
    for name in ("steer", "boost"):  # keys of evaluations without objectives stay as they were
        if not d[name]:
            d.pop(name)
    if params.calibrate is None:
        d.pop("calibrate")
        d.pop("calibrate_lambda")
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
    write_json(path, result, indent=1, sort_keys=True)
    return path, result, False
