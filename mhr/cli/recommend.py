"""`mhr recommend`: the top items for one stored user, or for every user to a Parquet file."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mhr.cli.common import context, run_name
from mhr.console import emit, err


def _declared(name: str):
    """The field `mhr eval` declares for an objective (`EvalParams`): both commands share its help and default."""
    import dataclasses

    from mhr.ranking.eval_params import EvalParams

    return next(f for f in dataclasses.fields(EvalParams) if f.name == name)


def _help(name: str) -> str:
    return _declared(name).metadata["help"]


def objectives_from(steer: list[str] | None, boost: list[str] | None, calibrate: str | None, lam: float):
    from mhr.ranking.objectives import objectives_from_texts

    objectives = objectives_from_texts(steer or (), boost or (), calibrate, lam)
    objectives.check()
    return objectives


def print_profile(profile: dict[str, dict[str, float]], top: int = 3) -> None:
    """"Comedy · 34% of your predicted interest", the largest groups of each prior."""
    for prior, groups in profile.items():
        cells = [f"{g} · {100 * p:.0f}%" for g, p in list(groups.items())[:top]]
        err.print(f"{prior}: " + ", ".join(cells) + " of your predicted interest")


def register(app: typer.Typer) -> None:
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
        steer: list[str] = typer.Option(None, "--steer", help=_help("steer"), rich_help_panel="Objectives"),
        boost: list[str] = typer.Option(None, "--boost", help=_help("boost"), rich_help_panel="Objectives"),
        calibrate: str = typer.Option(None, "--calibrate", help=_help("calibrate"), rich_help_panel="Objectives"),
        calibrate_lambda: float = typer.Option(_declared("calibrate_lambda").default, "--calibrate-lambda", help=_help("calibrate_lambda"),
                                               rich_help_panel="Objectives"),
    ) -> None:
        """Top items for one user, with the head behind each (the winner under max fusion); or for every
        user to a Parquet file.

        Example: mhr recommend hstu1-genre6-s0 --user 42 --fusion learned --explain

        Example: mhr recommend hstu1-genre6-s0 --all --out recs.parquet --top 20 --explain

        Example: mhr recommend hstu1-genre6-s0 --user 42 --steer "genre6:Children's=0.2" --explain

        With --explain the user's interest profile is shown too (p(group | history) per item prior); with
        --all --explain it goes to FILE.profile.parquet (user, prior, group, p) beside the export.
        """
        from mhr.cache import check_output
        from mhr.errors import UsageError
        from mhr.ranking.recommend import as_json as rec_json
        from mhr.ranking.recommend import export_recommendations, read_user_file, recommend
        from mhr.training.runs import load_run

        if all_users == (user is not None):
            raise UsageError("say whom to recommend for: --user ID or --all", hint="one of the two, not both")
        if not all_users and (out is not None or users_file is not None):
            raise UsageError("--out and --users go with --all", hint="mhr recommend RUN --all --out recs.parquet")
        if all_users and (out is None or as_json):
            raise UsageError("--all writes a Parquet file: give --out FILE (and no --json)",
                             hint="mhr recommend RUN --all --out recs.parquet")
        if all_users:
            check_output(out)  # before the run is loaded: refused at once
        objectives = objectives_from(steer, boost, calibrate, calibrate_lambda)
        c = context(ctx)
        ds = c.dataset()
        wanted = read_user_file(users_file) if users_file is not None else None
        loaded = load_run(ds, run_name(run))
        if all_users:
            summary = export_recommendations(loaded, ds, out, top, fusion, explain, not keep_history, wanted,
                                             objectives=objectives)
            emit(str(summary.path))
            return
        recs, info = recommend(loaded, ds, user, top, fusion, not keep_history, objectives=objectives,
                               profile=explain)
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
        if explain and info.get("profile"):
            print_profile(info["profile"])
        for r in recs:
            if not explain:
                emit(r.raw_id)
            elif fused:
                emit(json.dumps({"item": r.raw_id, "head": r.head, "heads_fused": r.heads_fused}))
            elif routed:
                emit(json.dumps({"item": r.raw_id, "head": r.head, "p_head": r.route_p}))
            else:
                emit(json.dumps({"item": r.raw_id, "head": r.head}))
