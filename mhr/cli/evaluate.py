"""`mhr eval`: rank a split and print its metrics."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from mhr.cli.common import context, dataclass_options, from_options, run_name, with_options
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
    extra += _objective_lines(result)
    if "head_usage@10" in result and len(result["head_usage@10"]) > 1:
        top = sorted(result["head_usage@10"].items(), key=lambda kv: -kv[1])[:6]
        extra.append("heads winning top-10: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in top))
    for line in extra:
        err.print(line)


def eval_cmd(
    ctx: typer.Context,
    run: str = typer.Argument(None, help="Run name or run:<name> (default: the current run, the last `mhr train` "
                              "finished)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON on stdout."),
    force: bool = typer.Option(False, help="Recompute even if cached."),
    **options: Any,
) -> None:
    """Rank the full catalogue for every user and score Recall/NDCG@K, H@K, C_KL@K, new-interest, groups, heads.

    Example: mhr eval RUN --steer "genre6:Children's=0.2" --json

    Example: mhr eval RUN --calibrate genre6 --calibrate-lambda 0.5
    """
    from mhr.ranking.eval_params import EvalParams
    from mhr.ranking.evaluate import evaluate

    c = context(ctx)
    ds = c.dataset()
    name = run_name(run) or latest_run(ds)
    params = from_options(EvalParams, options)
    path, result, cached = evaluate(ds, name, params, force=force, device=device)
    if cached:
        err.print(f"cached: {path}")
    print_eval(result)
    if as_json:
        emit_json(result)
    else:
        emit(str(path))


def _objective_lines(result: dict) -> list[str]:
    """C_KL, category coverage and each steered group's exposure at K = 10 (else the smallest K)."""
    k = 10 if 10 in result["ks"] else result["ks"][0]
    lines = []
    if result.get("c_kl", {}).get(f"@{k}") is not None:
        line = f"C_KL@{k} over {result['c_kl']['prior']} {result['c_kl'][f'@{k}']:.4f}"
        if "category_coverage" in result:
            line += f"; category coverage@{k} {100 * result['category_coverage'][f'@{k}']:.1f}%"
        lines.append(line)
    for text, at in result.get("steer", {}).items():
        cell = at[f"@{k}"]
        lines.append(f"steer {text}: share@{k} {100 * cell['share']:.1f}%, quota met for {100 * cell['met']:.1f}% "
                     "of users")
    for text, at in result.get("boost", {}).items():
        lines.append(f"boost {text}: share@{k} {100 * at[f'@{k}']['share']:.1f}%")
    return lines


def register(app: typer.Typer) -> None:
    from mhr.ranking.eval_params import EvalParams

    app.command("eval")(with_options(eval_cmd, dataclass_options(EvalParams)))
