"""`mhr priors …` commands: build, show and list human priors."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from mhr.cli.common import context, given_options, union_options, with_options
from mhr.console import emit, emit_json, err
from mhr.priors.kinds import EVENTS, HORIZON, ITEMS, KINDS, USERS, prior_kind

app = typer.Typer(help="Human priors: item categories, co-engagement communities, events, horizon "
                  "segments, user segments.", no_args_is_help=True)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


# every kind's parameters: the flags of `mhr priors build` (an option of another kind is refused)
_PARAMS = {kind: entry.params for kind, entry in KINDS.items()}


def build_cmd(
    ctx: typer.Context,
    kind: str = typer.Option(..., "--kind", "-k", help=f"{', '.join(KINDS)}."),
    name: str = typer.Option(None, "--name", help="Prior name (default: the kind), e.g. graph-11."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a prior with the same key exists."),
    **options: Any,
) -> None:
    """Derive one prior into the store; prints `prior:<name>`.

    The options of each kind are grouped below; an option of another kind is refused, one left out
    keeps the kind's default (shown in brackets).

    Examples: mhr priors build --kind item · mhr priors build --kind graph --clusters 11 --name graph-11 ·
    mhr priors build --kind temporal --horizon 8 --segments 2
    """
    from mhr.priors.build import build_prior, log_result, make_params

    params = make_params(kind, given_options(_PARAMS, options))
    result = build_prior(context(ctx).dataset(), kind, params, name=name, force=force)
    log_result(result)
    emit(result.reference)


app.command("build")(with_options(build_cmd, union_options(_PARAMS)))


def _table(info: dict) -> Table:
    d = info["diagnostics"]
    kind = info["kind"]
    table = Table(title=f"{info['reference']}  kind {kind}, {d['n_groups']} groups", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("group")
    size_col = {ITEMS: "items", USERS: "users", EVENTS: "interactions", HORIZON: "offsets"}[prior_kind(kind).maps]
    table.add_column(size_col, justify="right")
    share_cols = [c for c in ("share_items", "share_users", "share_interactions", "share_targets")
                  if any(c in g for g in d["groups"])]
    for c in share_cols:
        table.add_column(c.replace("share_", "% "), justify="right")
    top_tags = info["build"].get("top_tags", {})
    if top_tags:
        table.add_column("top tags")
    for g in d["groups"]:
        size = g.get(size_col)
        row = [str(g["group_id"]), g["name"], f"{size:,}" if isinstance(size, int) else str(size)]
        row += [_pct(g.get(c)) for c in share_cols]
        if top_tags:
            row.append(", ".join(top_tags.get(g["name"], [])))
        table.add_row(*row)
    summary = []
    for key, label, fmt in (
        ("coverage", "item coverage", _pct), ("items_without_group", "items in no group", str),
        ("users_without_group", "users in no group", str),
        ("interactions_without_group", "interactions in no group", str),
        ("multi_label_rate", "multi-label items", _pct), ("labels_per_item", "labels/item", str),
        ("label_entropy_normalised", "label entropy (normalised)", lambda x: f"{x:.3f}"),
        ("history_concentration", "history in top group", _pct),
        ("new_interest_users", "users with new-interest targets", _pct),
        ("modularity", "modularity", lambda x: f"{x:.3f}"),
    ):
        if key in d:
            summary.append(f"{label} {fmt(d[key])}")
    table.caption = " · ".join(summary)
    return table


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="Prior name (default: the only one, else all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the diagnostics as JSON on stdout."),
    targets: int = typer.Option(8, "--targets", help="Targets per user (each user's last τ interactions)."),
) -> None:
    """Groups with sizes and shares of items, interactions and targets; coverage, overlap,
    entropy, history concentration, modularity — what helps choose a prior."""
    from mhr.priors.diagnostics import list_info, show
    from mhr.store import connect

    con = connect(context(ctx).dataset().store_path, read_only=True)
    try:
        names = [name] if name else [r["prior"] for r in list_info(con)]
        if not names:
            from mhr.errors import NotFoundError

            raise NotFoundError("no prior is built for this dataset", hint="build one with `mhr priors build --kind item`")
        infos = [show(con, n, targets) for n in names]
    finally:
        con.close()
    if as_json:
        emit_json(infos[0] if name else infos)
        return
    for info in infos:
        err.print(_table(info))
        for w in info["build"].get("warnings", []):
            err.print(f"[yellow]warning:[/] {w}")
        for n in info["diagnostics"]["notes"]:
            err.print(f"[cyan]note:[/] {n}")


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """The priors built for this dataset."""
    from mhr.priors.diagnostics import list_info
    from mhr.store import connect

    con = connect(context(ctx).dataset().store_path, read_only=True)
    try:
        rows = list_info(con)
    finally:
        con.close()
    if as_json:
        emit_json(rows)
        return
    table = Table(title="priors", title_justify="left")
    for c in ("prior", "kind", "groups", "created", "key"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["prior"], r["kind"], str(r["groups"]), r["created"][:19], r["key"][:12])
    err.print(table)
