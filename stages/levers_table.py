"""The levers table of the README (issue 24, item 4): validation beside test for every variant.

    python stages/levers_table.py -w WORKSPACE -d ml-100k --recipe levers --seeds 0,1,2 \
        --variants base,item-router,global-head,global-head-router,…

Reads (or computes, through `mhr eval`'s cached stage) NDCG@10 at the last horizon on the valid and
the test split of every `RECIPE-VARIANT-sSEED` run, with max fusion and, for runs trained with a
router, routed fusion; prints mean ± 95% CI over seeds, each seed's valid figure, the paired Δ to
the plain backbone, and the valid → test drop (how well selecting on validation transfers).
"""

from __future__ import annotations

import argparse

import numpy as np

from mhr.errors import MhrError
from mhr.ranking.eval_params import EvalParams
from mhr.ranking.evaluate import evaluate
from mhr.ranking.metrics import mean_ci
from mhr.workspace import Workspace


def _ndcg(dataset, run: str, split: str, fusion: str) -> float | None:
    try:
        _, r, _ = evaluate(dataset, run, EvalParams(split=split, fusion=fusion, ks=(10, 50)))
    except MhrError:
        return None  # not trained (yet), or routed fusion of a run without a router
    return 100 * r["metrics"][f"ndcg@10/h{r['horizons'][-1]}"]


def _ci(values: list[float]) -> str:
    m, h = mean_ci(values)
    return f"{m:.2f}" + ("" if np.isnan(h) else f" ± {h:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("-d", "--dataset", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", required=True)
    a = ap.parse_args()
    dataset = Workspace.from_option(a.workspace).dataset(a.dataset)
    seeds = [int(s) for s in a.seeds.split(",")]
    base = {s: {sp: _ndcg(dataset, f"{a.recipe}-base-s{s}", sp, "max") for sp in ("valid", "test")} for s in seeds}
    print("| variant | fusion | seeds | valid NDCG@10 (per seed) | valid | test NDCG@10 | Δ test vs base (paired) "
          "| valid → test |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in a.variants.split(","):
        for fusion in ("max", "router"):
            if fusion == "router" and (variant == "base" or "router" not in variant):
                continue
            cells = {s: {sp: _ndcg(dataset, f"{a.recipe}-{variant}-s{s}", sp, fusion) for sp in ("valid", "test")}
                     for s in seeds}
            done = [s for s in seeds if cells[s]["test"] is not None and cells[s]["valid"] is not None]
            if not done:
                continue
            valid = [cells[s]["valid"] for s in done]
            test = [cells[s]["test"] for s in done]
            delta = [cells[s]["test"] - base[s]["test"] for s in done if base[s]["test"] is not None]
            drop = [100 * (1 - cells[s]["test"] / cells[s]["valid"]) for s in done]
            print(f"| {variant} | {'—' if variant == 'base' else fusion} | {len(done)} | "
                  f"{', '.join(f'{v:.2f}' for v in valid)} | {_ci(valid)} | {_ci(test)} | "
                  f"{_ci(delta) if variant != 'base' else '—'} | −{_ci(drop)}% |")


if __name__ == "__main__":
    main()
