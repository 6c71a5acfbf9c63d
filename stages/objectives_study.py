"""What do structured priors cost at decoding time? The README's objective table (issue 24, item 3).

    python stages/objectives_study.py -w WORKSPACE -d ml-100k --prior item \
        --base levers-base --heads levers-item-router --seeds 0,1,2 --out objectives-ml100k.json

For each seed it evaluates (evaluation only, no training; every evaluation is `mhr eval`'s cached
stage, so `mhr eval RUN --split valid --boost "item:G=1.5" --json` reproduces any point):

- three objectives over the prior's SMALLEST group G (fewest items) and the prior's groups:
  (a1) G's mean exposure in the top 10 ≥ 2 × its share of the catalogue's items;
  (a2) 20% of the lists from G: with `--steer G=0.2` every list holds ≥ 2 of its top 10 from G where
       the user's candidates allow (target: ≥ 95% of users' lists meet it); a boost has no per-list
       guarantee, so for boosts the target is G's MEAN exposure ≥ 20% (a weaker target, said so);
  (b)  calibration: C_KL@10 over the prior's groups at most half the plain backbone's (valid);
- with each decoder: the plain backbone + `--steer` (the quota share) / `--boost` (β) /
  `--calibrate` (λ); the heads with max fusion + head boosts / `--calibrate`; the heads with the
  router (`--fusion router`) + boosts / `--calibrate`;
- the knob is SELECTED ON VALIDATION (the smallest value of its grid meeting the target on the valid
  split) and applied once on test. A decoder whose grid never meets the target on valid is reported
  as "not met" with its largest value.

Prints a table (NDCG@10 at the last horizon, mean ± 95% CI over seeds; the test objective reached;
ΔNDCG@10 paired against the plain backbone of the same seed) and writes every point as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mhr.ranking.eval_params import EvalParams
from mhr.ranking.evaluate import evaluate
from mhr.ranking.metrics import mean_ci
from mhr.workspace import Workspace

BETAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0)
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)  # of a top 10: 1, 2, 3, 4, 5 items
LAMBDAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)


@dataclass(frozen=True)
class Decoder:
    name: str
    role: str  # "base" or "heads"
    fusion: str
    knob: str  # "steer", "boost" or "calibrate"


DECODERS = (
    Decoder("backbone + steer", "base", "max", "steer"),
    Decoder("backbone + boost", "base", "max", "boost"),
    Decoder("backbone + calibrate", "base", "max", "calibrate"),
    Decoder("heads (max) + head boost", "heads", "max", "boost"),
    Decoder("heads (max) + calibrate", "heads", "max", "calibrate"),
    Decoder("heads (router) + head boost", "heads", "router", "boost"),
    Decoder("heads (router) + calibrate", "heads", "router", "calibrate"),
)


def _params(split: str, fusion: str, prior: str, group: str, knob: str | None, value: float) -> EvalParams:
    common = dict(split=split, fusion=fusion, ks=(10,), entropy_prior=prior)
    if knob == "steer":
        return EvalParams(**common, steer=(f"{prior}:{group}={value:g}",))
    if knob == "calibrate":
        return EvalParams(**common, calibrate=prior, calibrate_lambda=value, boost=(f"{prior}:{group}=0",))
    return EvalParams(**common, boost=(f"{prior}:{group}={value:g}",))  # boost; β = 0: the plain list


def _point(dataset, run: str, params: EvalParams, group_text: str) -> dict[str, float]:
    _, r, _ = evaluate(dataset, run, params)
    h = r["horizons"][-1]
    flag = "steer" if params.steer else "boost"
    cell = next(iter(r[flag].values()))["@10"]
    met = cell.get("met")
    return {"ndcg": 100 * r["metrics"][f"ndcg@10/h{h}"], "share": cell["share"],
            "met": float("nan") if met is None else met, "c_kl": r["c_kl"]["@10"]}


def _smallest_group(dataset, run: str, prior: str) -> tuple[str, float]:
    _, r, _ = evaluate(dataset, run, EvalParams(split="valid", ks=(10,), entropy_prior=prior))
    groups = r["target_groups"]["groups"]
    name = min(groups, key=lambda g: groups[g]["item_share"])
    return name, groups[name]["item_share"]


def _select(grid, meets: Callable[[dict[str, float]], bool], point: Callable[[float], dict[str, float]]):
    """The smallest knob of `grid` whose valid point meets the target (None: never met; the last is kept)."""
    last = None
    for v in grid:
        last = (v, point(v))
        if meets(last[1]):
            return v, True
    return last[0], False


def study(ws: str, ds: str, prior: str, base: str, heads: str, seeds: list[int]) -> dict[str, Any]:
    dataset = Workspace.from_option(ws).dataset(ds)
    group, item_share = _smallest_group(dataset, f"{base}-s{seeds[0]}", prior)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        runs = {"base": f"{base}-s{seed}", "heads": f"{heads}-s{seed}"}
        plain = {s: _point(dataset, runs["base"], _params(s, "max", prior, group, "boost", 0), group)
                 for s in ("valid", "test")}
        targets = {"a1": 2 * item_share, "a2": 0.95, "b": plain["valid"]["c_kl"] / 2}
        for d in DECODERS:
            run = runs[d.role]
            base_point = _point(dataset, run, _params("valid", d.fusion, prior, group, "boost", 0), group)
            for objective in ("a1", "a2", "b"):
                if (objective == "b") != (d.knob == "calibrate"):
                    continue
                grid = {"steer": SHARES, "boost": BETAS, "calibrate": LAMBDAS}[d.knob]
                if objective == "a2" and d.knob == "steer":
                    grid = (0.2,)

                def point(v: float, split: str = "valid", d: Decoder = d, run: str = run,
                          objective: str = objective) -> dict[str, float]:
                    return _point(dataset, run, _params(split, d.fusion, prior, group, d.knob, v), group)

                meets = {"a1": lambda p, t=targets["a1"]: p["share"] >= t,
                         "a2": lambda p, k=d.knob: (p["met"] >= 0.95) if k == "steer" else p["share"] >= 0.2,
                         "b": lambda p, t=targets["b"]: p["c_kl"] <= t}[objective]
                v, ok = _select(grid, meets, point)
                test = point(v, "test")
                rows.append({"seed": seed, "decoder": d.name, "objective": objective, "knob": d.knob,
                             "value": v, "met_on_valid": ok, "target": targets[objective],
                             "valid_plain": base_point, "test": test,
                             "delta_ndcg": test["ndcg"] - plain["test"]["ndcg"]})
        rows.append({"seed": seed, "decoder": "backbone (plain)", "objective": "-", "test": plain["test"],
                     "valid_plain": plain["valid"], "delta_ndcg": 0.0})
    return {"dataset": ds, "prior": prior, "group": group, "item_share": item_share, "rows": rows}


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    out = [f"{result['dataset']} · prior {result['prior']} · smallest group {result['group']} "
           f"({100 * result['item_share']:.1f}% of items)", "",
           "| objective | decoder | knob (valid-selected, per seed) | NDCG@10 | Δ vs backbone | exposure of G@10 | "
           "quota met@10 | C_KL@10 |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["objective"], r["decoder"]) for r in rows}, key=lambda k: (k[0] != "-", k))
    for objective, dec in keys:
        sel = [r for r in rows if r["objective"] == objective and r["decoder"] == dec]

        def ci(vals: list[float], digits: int = 2) -> str:
            m, h = mean_ci(vals)
            return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")

        knobs = ", ".join(f"{r['value']:g}" + ("" if r["met_on_valid"] else " (not met)") for r in sel) \
            if objective != "-" else "—"
        out.append(f"| {objective} | {dec} | {knobs} | {ci([r['test']['ndcg'] for r in sel])} | "
                   f"{ci([r['delta_ndcg'] for r in sel])} | {ci([r['test']['share'] for r in sel], 3)} | "
                   f"{ci([r['test']['met'] for r in sel], 3)} | {ci([r['test']['c_kl'] for r in sel], 3)} |")
    return "\n".join(out)


def frontier(ws: str, ds: str, prior: str, group: str, base: str, heads: str, seeds: list[int]) -> str:
    """Every decoder along its knob's grid on the VALID split (mean over seeds): NDCG@10 against G's
    exposure (steer, boost) or C_KL@10 (calibrate) — the curves behind the selected points."""
    dataset = Workspace.from_option(ws).dataset(ds)
    out = ["| decoder | knob | NDCG@10 (valid) | exposure of G@10 | C_KL@10 |", "|---|---|---|---|---|"]
    for d in DECODERS:
        grid = (0.0, *{"steer": SHARES, "boost": BETAS, "calibrate": LAMBDAS}[d.knob])
        for v in grid:
            knob = "boost" if v == 0 else d.knob
            pts = [_point(dataset, f"{base if d.role == 'base' else heads}-s{s}",
                          _params("valid", d.fusion, prior, group, knob, v), group) for s in seeds]
            mean = {k: float(np.mean([p[k] for p in pts])) for k in ("ndcg", "share", "c_kl")}
            out.append(f"| {d.name} | {d.knob} {v:g} | {mean['ndcg']:.2f} | {mean['share']:.3f} | {mean['c_kl']:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("-d", "--dataset", required=True)
    ap.add_argument("--prior", required=True)
    ap.add_argument("--base", required=True, help="run name of the plain backbone, without -sSEED")
    ap.add_argument("--heads", required=True, help="run name of the head run (trained with --router)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--frontier", action="store_true", help="also print every grid point on valid")
    a = ap.parse_args()
    result = study(a.workspace, a.dataset, a.prior, a.base, a.heads, [int(s) for s in a.seeds.split(",")])
    print(table(result))
    if a.frontier:
        print()
        print(frontier(a.workspace, a.dataset, a.prior, result["group"], a.base, a.heads,
                       [int(s) for s in a.seeds.split(",")]))
    with open(a.out, "w") as f:
        json.dump(_finite(result), f, indent=1, allow_nan=False)


def _finite(x: Any) -> Any:
    """NaN (an undefined CI or `met` of a decoder without a quota) as null: strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
