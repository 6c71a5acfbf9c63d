"""`mhr priors …` commands: build, show and list human priors."""

from __future__ import annotations

import typer
from rich.table import Table

from mhr.cli.common import context, parse_list
from mhr.console import emit, emit_json, err

app = typer.Typer(help="Human priors: item categories, co-engagement communities, events, horizon "
                  "segments, user segments.", no_args_is_help=True)

_ITEM = "item options"
_GRAPH = "graph / user options"
_OTHER = "event / temporal / user options"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


@app.command("build")
def build_cmd(
    ctx: typer.Context,
    kind: str = typer.Option(..., "--kind", "-k", help="item, graph, event, temporal or user."),
    name: str = typer.Option(None, "--name", help="Prior name (default: the kind), e.g. graph-11."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a prior with the same key exists."),
    categories: str = typer.Option(None, "--categories", help="Target category names 'A,B,C' (MiniLM zero-shot, or the LLM's choices).", rich_help_panel=_ITEM),
    n_categories: int = typer.Option(None, "--n-categories", help="Cluster tags into K categories named from member tags.", rich_help_panel=_ITEM),
    map_file: str = typer.Option(None, "--map", help="Tag -> categories file (TOML or CSV).", rich_help_panel=_ITEM),
    llm: str = typer.Option(None, "--llm", help="'openai': consolidate with an OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY).", rich_help_panel=_ITEM),
    model: str = typer.Option(None, "--model", help="LLM model name (default: $OPENAI_MODEL or gpt-4o-mini).", rich_help_panel=_ITEM),
    base_url: str = typer.Option(None, "--base-url", help="LLM endpoint (default: $OPENAI_BASE_URL).", rich_help_panel=_ITEM),
    batch_size: int = typer.Option(None, "--batch-size", help="Tags per LLM request [40].", rich_help_panel=_ITEM),
    timeout: float = typer.Option(None, "--timeout", help="Seconds per LLM request [60].", rich_help_panel=_ITEM),
    retries: int = typer.Option(None, "--retries", help="Attempts per LLM request [4].", rich_help_panel=_ITEM),
    threshold: float = typer.Option(None, "--threshold", help="Zero-shot cosine threshold for extra labels [0.5].", rich_help_panel=_ITEM),
    template: str = typer.Option(None, "--template", help="Text around each tag/category for MiniLM, e.g. '{} movies' ['{}'].", rich_help_panel=_ITEM),
    level: int = typer.Option(None, "--level", help="Category-path level to use (1 = top).", rich_help_panel=_ITEM),
    top: int = typer.Option(None, "--top", help="Keep the N most frequent categories, the rest -> 'other'.", rich_help_panel=_ITEM),
    untagged: str = typer.Option(None, "--untagged", help="Items without a tag: all (every group) or other ['all'].", rich_help_panel=_ITEM),
    unknown_tags: str = typer.Option(None, "--unknown-tags", help="Tags meaning 'unknown' (treated as no tag) ['unknown,(no genres listed),…'].", rich_help_panel=_ITEM),
    clusters: int = typer.Option(None, "--clusters", help="Number of communities to reach (resolution search).", rich_help_panel=_GRAPH),
    min_size: int = typer.Option(None, "--min-size", help="Communities smaller than this merge into 'other' [5].", rich_help_panel=_GRAPH),
    holdout: int = typer.Option(None, "--holdout", help="Last interactions per user never read (≥ 2τ of the windows) [16].", rich_help_panel=_GRAPH),
    cap: int = typer.Option(None, "--cap", help="graph: last training interactions per user [1000].", rich_help_panel=_GRAPH),
    per_item: int = typer.Option(None, "--per-item", help="user: users sampled per item [2000].", rich_help_panel=_GRAPH),
    neighbors: int = typer.Option(None, "--neighbors", help="Edges kept per node (top cosine; 0 = all) [50].", rich_help_panel=_GRAPH),
    weights: str = typer.Option(None, "--weights", help="Edge weights: count (co-count) or binary ['count'].", rich_help_panel=_GRAPH),
    isolated: str = typer.Option(None, "--isolated", help="graph: items without edges -> other or all ['other'].", rich_help_panel=_GRAPH),
    seed: int = typer.Option(None, "--seed", help="Leiden / sampling seed [0].", rich_help_panel=_GRAPH),
    buckets: str = typer.Option(None, "--buckets", help="event: 'dislike:1-2,neutral:3,like:4,love:5' (default for 1–5 ratings).", rich_help_panel=_OTHER),
    horizon: int = typer.Option(None, "--horizon", help="temporal: forecast horizon τ [8].", rich_help_panel=_OTHER),
    segments: int = typer.Option(None, "--segments", help="temporal: equal segments (2 = ST/LT) [2].", rich_help_panel=_OTHER),
    boundaries: str = typer.Option(None, "--boundaries", help="temporal: last offset of each segment, e.g. '2,8'.", rich_help_panel=_OTHER),
    from_attributes: str = typer.Option(None, "--from-attributes", help="user: segment by attributes 'age,gender'.", rich_help_panel=_OTHER),
    bins: int = typer.Option(None, "--bins", help="user: quantile bins for numeric attributes [4].", rich_help_panel=_OTHER),
) -> None:
    """Derive one prior into the store; prints `prior:<name>`.

    Examples: mhr priors build --kind item · mhr priors build --kind graph --clusters 11 --name graph-11 ·
    mhr priors build --kind temporal --horizon 8 --segments 2
    """
    from mhr.priors.build import build_prior, log_result, make_params

    options = dict(
        categories=tuple(parse_list(categories)), n_categories=n_categories, map_file=map_file, llm=llm,
        model=model, llm_base_url=base_url, batch_size=batch_size, timeout=timeout, retries=retries,
        threshold=threshold, template=template, level=level, top=top, untagged=untagged,
        unknown_tags=tuple(parse_list(unknown_tags)), clusters=clusters, min_size=min_size, holdout=holdout,
        cap=cap, per_item=per_item, neighbors=neighbors, weights=weights, isolated=isolated, seed=seed,
        buckets=buckets, horizon=horizon, segments=segments, boundaries=tuple(parse_list(boundaries, int)),
        from_attributes=tuple(parse_list(from_attributes)), bins=bins,
    )
    params = make_params(kind, options)
    result = build_prior(context(ctx).dataset(), kind, params, name=name, force=force)
    log_result(result)
    emit(result.reference)


def _table(info: dict) -> Table:
    from mhr.priors.kinds import EVENTS, HORIZON, ITEMS, USERS, prior_kind

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
