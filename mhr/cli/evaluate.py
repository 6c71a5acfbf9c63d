"""`mhr eval` and `mhr recommend`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mhr.cli.common import context, parse_list
from mhr.console import emit, emit_json, err


def latest_run(dataset) -> str:
    """The run `mhr eval` uses when given none: the last one `mhr train` finished (or found cached), as
    recorded in the dataset's `current.json`; without a record, the only finished run. Never the newest
    by time: a recorded run that is gone, or several runs and no record, is an error listing them."""
    from mhr.errors import NotFoundError, UsageError
    from mhr.workspace import read_current

    finished = sorted(p.parent.name for p in dataset.runs_dir.glob("*/manifest.json")) \
        if dataset.runs_dir.is_dir() else []
    listing = ", ".join(finished[:12]) + (f" … ({len(finished)} in all)" if len(finished) > 12 else "")
    recorded = read_current(dataset).get("run")
    if recorded in finished:
        return recorded
    if recorded:
        raise NotFoundError(f"the current run {recorded!r} (from the last `mhr train`) is missing or unfinished "
                            f"in {dataset.runs_dir}; finished: {listing or 'none'}",
                            hint="name one: `mhr eval RUN`")
    if not finished:
        raise NotFoundError(f"no finished run in {dataset.runs_dir}", hint="train one with `mhr train`")
    if len(finished) > 1:
        raise UsageError(f"several runs and none chosen: {listing}", hint="name one: `mhr eval RUN`")
    return finished[0]


def _strip(ref: str | None) -> str | None:
    return ref.split(":", 1)[1] if ref and ref.startswith("run:") else ref


def print_eval(result: dict) -> None:
    ks, hs = result["ks"], result["horizons"]
    title = f"{result['run']} · {result['split']} · fusion {result['params']['fusion']}"
    if result.get("oracle"):
        group = result["params"].get("oracle_group")
        what = f"ranked inside the first target's {group} group" if group else "true next event type used"
        title += f" · [bold red]ORACLE ({what})[/]"
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
        device: str = typer.Option("cpu", help="cpu or cuda."),
        as_json: bool = typer.Option(False, "--json", help="Print the result JSON on stdout."),
        force: bool = typer.Option(False, help="Recompute even if cached."),
    ) -> None:
        """Rank the full catalogue for every user and score Recall/NDCG@K, H@K, new-interest, groups, heads."""
        from mhr.ranking.evaluate import EvalParams, evaluate

        c = context(ctx)
        ds = c.dataset()
        name = _strip(run) or latest_run(ds)
        params = EvalParams(
            fusion=fusion, ks=tuple(parse_list(k, int)), horizons=tuple(parse_list(horizons, int)),
            split=split, keep_history=keep_history, oracle_event=oracle_event,
            baseline=_strip(baseline), entropy_prior=entropy_prior, diversity=diversity,
            oracle_group=oracle_group,
        )
        path, result, cached = evaluate(ds, name, params, force=force, device=device)
        if cached:
            err.print(f"cached: {path}")
        print_eval(result)
        if as_json:
            emit_json(result)
        else:
            emit(str(path))

    @app.command("recommend")
    def recommend_cmd(
        ctx: typer.Context,
        run: str = typer.Argument(..., help="Run name or run:<name>."),
        user: str = typer.Option(None, "--user", help="The user's raw id in the source data."),
        all_users: bool = typer.Option(
            False, "--all", help="Every user (or those of --users) to the Parquet file --out: user, rank, item "
            "(raw ids), score, head (null without --explain); written whole or not at all."),
        out: Path = typer.Option(None, "--out", help="With --all: the Parquet file to write."),
        users_file: Path = typer.Option(None, "--users", help="With --all: only these raw user ids, one a line."),
        top: int = typer.Option(10, min=1, help="How many items."),
        fusion: str = typer.Option(
            "max", help="Any `mhr eval` fusion, ranked alike: max (explained by the winning head), avg, learned or "
            "invvar (per-head parameters fitted on the valid split once, cached with the run's evaluations), "
            "router (runs trained with --router; explained by the winning head)."),
        explain: bool = typer.Option(
            False, "--explain", help="Show which head recommended each item: under max the winning head; under "
            "avg/learned/invvar no head wins, so the head with the largest term of the fused score and how many "
            "heads were fused (1 = it alone scored the item)."),
        keep_history: bool = typer.Option(False, "--keep-history", help="Allow already-seen items."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    ) -> None:
        """Top items for one user, with the head behind each (the winner under max fusion); or for every
        user to a Parquet file.

        Example: mhr recommend hstu1-genre6-s0 --user 42 --fusion learned --explain

        Example: mhr recommend hstu1-genre6-s0 --all --out recs.parquet --top 20 --explain
        """
        from mhr.errors import UsageError
        from mhr.ranking.recommend import as_json as rec_json
        from mhr.ranking.recommend import export_recommendations, read_user_file, recommend
        from mhr.train import load_run

        if all_users == (user is not None):
            raise UsageError("say whom to recommend for: --user ID or --all", hint="one of the two, not both")
        if not all_users and (out is not None or users_file is not None):
            raise UsageError("--out and --users go with --all", hint="mhr recommend RUN --all --out recs.parquet")
        if all_users and (out is None or as_json):
            raise UsageError("--all writes a Parquet file: give --out FILE (and no --json)",
                             hint="mhr recommend RUN --all --out recs.parquet")
        c = context(ctx)
        ds = c.dataset()
        wanted = read_user_file(users_file) if users_file is not None else None
        loaded = load_run(ds, _strip(run))
        if all_users:
            summary = export_recommendations(loaded, ds, out, top, fusion, explain, not keep_history, wanted)
            emit(str(summary.path))
            return
        recs, info = recommend(loaded, ds, user, top, fusion, not keep_history)
        if as_json:
            typer.echo(rec_json(recs, info))
            return
        err.print(f"user {user}: {info['history_length']} interactions; recently: "
                  + "; ".join(t or "?" for t in info["recent_titles"][:3]))
        table = Table(title=f"fusion {fusion}" + (" (fitted on valid)" if info.get("fitted_on") else ""),
                      title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("item")
        table.add_column("title")
        table.add_column("score", justify="right")
        routed = fusion == "router"
        fused = fusion not in ("max", "router")
        if explain:
            table.add_column("largest contribution (of heads fused)" if fused else "recommended by")
            if routed:
                table.add_column("p(head | user)", justify="right")
        for r in recs:
            row = [str(r.rank), r.raw_id, r.title or "", f"{r.score:.3f}"]
            if explain:
                row.append(f"{r.head} ({r.heads_fused})" if fused and r.head else r.head or "—")
                if routed:
                    row.append("—" if r.route_p is None else f"{r.route_p:.3f}")
            table.add_row(*row)
        err.print(table)
        for r in recs:
            if not explain:
                emit(r.raw_id)
            elif fused:
                emit(json.dumps({"item": r.raw_id, "head": r.head, "heads_fused": r.heads_fused}))
            elif routed:
                emit(json.dumps({"item": r.raw_id, "head": r.head, "p_head": r.route_p}))
            else:
                emit(json.dumps({"item": r.raw_id, "head": r.head}))
