"""`mhr train`: windows + priors → a trained run in runs/<name>/.

The training options are not declared here: one per `TrainParams` field (`mhr/training/params.py`),
with the field's name as the flag, its help text and its default.
"""

from __future__ import annotations

from typing import Any

import typer

from mhr.cli.common import context, dataclass_options, flags_given, from_options, with_options
from mhr.console import emit, err
from mhr.training.params import TrainParams, default_run_name

_RUN = "Run"


def train_cmd(
    ctx: typer.Context,
    windows: str = typer.Option(None, help="Windows reference (default: the current ones, from the last "
                                "`mhr windows build`).", rich_help_panel=_RUN),
    name: str = typer.Option(None, help="Run name (default: derived from the parameters).", rich_help_panel=_RUN),
    device: str = typer.Option("cpu", help="cpu, cuda or mps (bf16 autocast on cuda).", rich_help_panel=_RUN),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps (always at each validation).",
                                         rich_help_panel=_RUN),
    resume: str = typer.Option(None, help="Continue the interrupted run RUN from its last checkpoint (with the "
                               "parameters it was started with).", rich_help_panel=_RUN),
    force: bool = typer.Option(False, help="Retrain even if a run with the same key exists.", rich_help_panel=_RUN),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="One CPU thread and torch's deterministic algorithms: identical runs "
        "give identical weights, and --resume ends where an uninterrupted run does. Without it, CPU runs with "
        "several threads differ in the last bits (parallel gradient sums in varying order); GPU runs are not "
        "guaranteed bit-identical. Recorded in config.json (kept by --resume), not in the run key.",
        rich_help_panel=_RUN),
    **options: Any,
) -> None:
    """Train a backbone with prior-conditioned heads; prints `run:<name>`.

    Example: mhr train --backbone hstu --size 1 --priors item,temporal --compose hierarchical

    Ablations and baselines on the same backbone and loss: --priors random:8 (items in 8 random
    groups), --priors all:8 (8 heads over every item), --decoder comirec --interests 8,
    --decoder remi --interests 8 --negatives 256 --beta 1.
    """
    from mhr.training.runs import resume_params
    from mhr.training.train import train
    from mhr.workspace import record_current

    c = context(ctx)
    ds = c.dataset()
    if resume:
        ignored = flags_given(ctx, [*options, "windows", "name"])
        if ignored:
            err.print(f"[yellow]--resume continues {resume} with the parameters it was started with: "
                      f"{', '.join(ignored)} ignored[/]", soft_wrap=True)
        params, windows = resume_params(ds, resume)
        name = resume
    else:
        params = from_options(TrainParams, options)
    name = name or default_run_name(params)
    try:
        result = train(ds, params, windows=windows, name=name, device=device, force=force,
                       resume=bool(resume), checkpoint_every=checkpoint_every, deterministic=deterministic)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: `main` prints this note as the hint
        e.add_note(f"continue it from its last checkpoint with `mhr train --resume {name}`")
        raise
    if result.cached:
        err.print(f"cached: run {result.name} (key {result.key[:12]})")
    else:
        best = result.best
        err.print(f"trained {result.name}: best valid NDCG@10 {best.get('valid_ndcg@10', float('nan')):.4f} "
                  f"at step {best.get('step')} of {best.get('steps')}")
    record_current(ds, run=result.name)  # `mhr eval` without a run evaluates this one
    emit(f"run:{result.name}")


def register(app: typer.Typer) -> None:
    app.command("train")(with_options(train_cmd, dataclass_options(TrainParams)))
