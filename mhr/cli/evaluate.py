"""`mhr eval`: rank a split and print its metrics."""

from __future__ import annotations

import typer
from rich.table import Table

from mhr.cli.common import context, parse_list, run_name
from mhr.console import emit, emit_json, err
from mhr.workspace import current_run


def print_eval(result: dict) -> None:
    ks, hs = result["ks"], result["horizons"]
    title = f"{result['run']} · {result['split']} · fusion {result['params']['fusion']}"
    if result.get("oracle"):
        group = result["params"].get("oracle_group")
        what = f"ranked inside the first target's {group} group" if group else "true next event type used"
        title += f" · [bold red]ORACLE ({what})[/]"
    if result.get("scored_users", result.get("split_users")) != result.get("split_users"):
        title += f" · sample of {result['scored_users']:,} of {result['split_users']:,} users"
    table = Table(title=title, title_justify="left")
    table.add_column("horizon")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
        table.add_column(f"N@{k}", justify="right")
    m = result["metrics"]
    for h in hs:
        row = [str(h)]
        for k in ks:
            row += [f"{100 * m.get(f'recall@{k}/h{h}', 0):.2f}", f"{100 * m.get(f'ndcg@{k}/h{h}', 0):.2f}"]
        table.add_row(*row)
    err.print(table)
    extra = [f"users {m.get('users')}"]
    if "entropy" in result:
        extra.append("entropy " + ", ".join(f"{k} {v:.3f}" for k, v in result["entropy"].items() if k != "prior"))
    extra.append("coverage " + ", ".join(f"{k} {v:.3f}" for k, v in result["coverage"].items()))
    if "new_interest" in result:
        ni = result["new_interest"]
        line = f"new-interest users {ni['metrics'].get('users')} ({100 * ni['share']:.1f}%)"
        n10 = ni["metrics"].get(f"ndcg@10/h{hs[-1]}")
        if n10 is not None:
            line += f", N@10 {100 * n10:.2f}"
        if ni.get("boost") and ni["boost"].get(f"ndcg@10/h{hs[-1]}") is not None:
            line += f" (boost vs {ni['baseline']['run']}: {100 * ni['boost'][f'ndcg@10/h{hs[-1]}']:+.1f}%)"
        extra.append(line)
    if "cold" in result:
        cold = result["cold"]
        line = f"cold targets {cold['targets']} ({cold['users']} users, {cold['items']} items never in training)"
        n10 = cold["metrics"].get(f"ndcg@10/h{hs[-1]}")
        r10 = cold["metrics"].get(f"recall@10/h{hs[-1]}")
        if n10 is not None:
            line += f", R@10 {100 * r10:.2f}, N@10 {100 * n10:.2f}"
        extra.append(line)
    if "fusion" in result:
        fit = result["fusion"]
        what = fit.get("weights") or fit.get("scale") or {}
        desc = ", ".join(f"{n} {v:.2f}" for n, v in list(what.items())[:6])
        name = "weights" if "weights" in fit else "scale"
        line = f"{fit['kind']} fusion fitted on valid{' (IN-SAMPLE)' if fit.get('in_sample') else ''}: {name} {desc}"
        info = fit.get("info", {})
        if "ce_learned" in info:
            line += f"; valid CE {info['ce_avg']:.3f} (avg) → {info['ce_learned']:.3f}"
        extra.append(line)
    if "target_groups" in result and 10 in ks:
        tg = result["target_groups"]
        cells = [(n, g["item_share"], g["metrics"].get(f"ndcg@10/h{hs[-1]}")) for n, g in tg["groups"].items()]
        extra.append(f"N@10 by the first target's {tg['prior']} group (share of items): " + ", ".join(
            f"{n} ({100 * share:.0f}%) {100 * v:.2f}" for n, share, v in cells if v is not None))
    if "head_usage@10" in result and len(result["head_usage@10"]) > 1:
        top = sorted(result["head_usage@10"].items(), key=lambda kv: -kv[1])[:6]
        extra.append("heads winning top-10: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in top))
    for line in extra:
        err.print(line)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        ctx: typer.Context,
        run: str = typer.Argument(None, help="Run name or run:<name> (default: the current run, the last `mhr train` finished)."),
        fusion: str = typer.Option(
            "max", help="How eligible heads' scores fuse: max (explainable), avg, learned (per-head "
            "calibration fitted on the valid split), invvar (inverse-variance weights from the valid split) or "
            "router (max over heads of log p(k | h) + log p(i | k, h); runs trained with --router)."),
        k: str = typer.Option("5,10,50,200", "--k", help="Cut-offs K."),
        horizons: str = typer.Option(
            "", help="Horizons to score, e.g. 1,4,8: the first h held-out targets, h ≤ H (default 1, τ/2, τ; "
            "and H for windows built with --holdout H)."),
        split: str = typer.Option("test", help="valid or test."),
        keep_history: bool = typer.Option(False, "--keep-history", help="Do not exclude already-seen items."),
        oracle_event: bool = typer.Option(False, "--oracle-event",
                                          help="DIAGNOSTIC ORACLE: mask heads with the true next event type."),
        oracle_group: str = typer.Option(
            None, help="DIAGNOSTIC ORACLE: rank only items sharing a group of this item/graph prior with the "
            "user's first target (for a head run: routing to the target's heads; for a plain backbone: its "
            "fair control)."),
        baseline: str = typer.Option(None, help="Baseline run for the new-interest boost."),
        entropy_prior: str = typer.Option(None, help="Item prior whose categories H@K counts (default: item)."),
        diversity: float = typer.Option(
            0.0, help="λ of ComiRec's greedy category-diversity re-ranking over the top 2K fused items "
            "(categories of --entropy-prior; 0 = plain ranking)."),
        sample_users: int = typer.Option(
            None, help="Score a seeded sample of this many users of the split (the same users for every run "
            "on these windows, so runs stay paired); default: every user. For quick looks at big logs."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        as_json: bool = typer.Option(False, "--json", help="Print the result JSON on stdout."),
        force: bool = typer.Option(False, help="Recompute even if cached."),
    ) -> None:
        """Rank the full catalogue for every user and score Recall/NDCG@K, H@K, new-interest, groups, heads."""
        from mhr.ranking.evaluate import EvalParams, evaluate

        c = context(ctx)
        ds = c.dataset()
        name = run_name(run) or current_run(ds)
        params = EvalParams(
            fusion=fusion, ks=tuple(parse_list(k, int)), horizons=tuple(parse_list(horizons, int)),
            split=split, keep_history=keep_history, oracle_event=oracle_event,
            baseline=run_name(baseline), entropy_prior=entropy_prior, diversity=diversity,
            oracle_group=oracle_group, sample_users=sample_users,
        )
        path, result, cached = evaluate(ds, name, params, force=force, device=device)
        if cached:
            err.print(f"cached: {path}")
        print_eval(result)
        if as_json:
            emit_json(result)
        else:
            emit(str(path))
