"""The `mhr` command line: typer wiring only; each command calls one library function."""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

import typer
import typer.main
from rich.markup import escape

from mhr.cli.common import Context, refuse_non_finite_floats
from mhr.console import err
from mhr.errors import EXIT_CODES, DiskError, MhrError, disk_full_error
from mhr.store import damaged_store_error
from mhr.threads import apply_threads
from mhr.workspace import Workspace

app = typer.Typer(
    name="mhr",
    help=(
        "Train generative sequential recommenders decoded by prior-conditioned heads.\n\n"
        "Pipeline: mhr data … → mhr priors build → mhr windows build → mhr train → mhr eval → "
        "mhr recommend / mhr serve / mhr report; or `mhr run stages/<recipe>.toml` for a whole experiment. "
        "Every stage prints the reference of what it made on stdout; logs go to stderr."
    ),
    epilog="Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES) + ".",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def root(
    ctx: typer.Context,
    workspace: str = typer.Option(
        None, "--workspace", "-w", envvar="MHR_WORKSPACE", help="Artifact root (default: ./workspace)."
    ),
    dataset: str = typer.Option(
        None, "--dataset", "-d", envvar="MHR_DATASET", help="Dataset name (default: the only one)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
    threads: int = typer.Option(
        None, "--threads", envvar="MHR_THREADS", min=1,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores not busy by the load average)."),
) -> None:
    apply_threads(threads)
    ctx.obj = Context(Workspace.from_option(workspace), dataset, verbose)


def _register() -> None:
    from mhr.cli import data, evaluate, gc, priors, recommend, report, run, serve, status, train, windows

    app.add_typer(data.app, name="data")
    app.add_typer(priors.app, name="priors")
    app.add_typer(windows.app, name="windows")
    for module in (train, evaluate, recommend, serve, report, run, status, gc):
        module.register(app)


_register()


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort, Exit) classes of every click the installed typer may raise.

    typer >= 0.22 bundles its own copy of click (`typer._click`) whose exceptions are not those of
    a separately installed click; older typer re-exports click itself. Catch both.
    """
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    errors = {m.ClickException for m in modules}
    aborts = {typer.Abort, *(getattr(m, "Abort", typer.Abort) for m in modules)}
    exits = {typer.Exit, *(getattr(m, "Exit", typer.Exit) for m in modules)}
    return tuple(errors), tuple(aborts), tuple(exits)


CLICK_ERRORS, ABORTS, EXITS = _click_exceptions()


def _fail(message: str, hint: str | None, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err.print(f"[dim]hint: {escape(hint)}[/]", soft_wrap=True)
    sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, systemd and `docker stop` send), raised where a Ctrl-C would be so
    that every clean-up a Ctrl-C runs (temp files removed, nothing half-written kept) runs alike."""


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Terminated()


def _interrupted(e: BaseException | None = None) -> NoReturn:
    terminated = _chain_has(e, lambda x: isinstance(x, Terminated))
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    notes = [n for x in _chain(e) for n in getattr(x, "__notes__", ())]
    err.print(f"[red]{what}[/]: nothing half-written was kept; "
              + ("; ".join(notes) if notes else "rerun to complete"), soft_wrap=True)
    sys.exit(128 + signal.SIGTERM if terminated else 130)


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and the exceptions it was raised from or while handling."""
    out: list[BaseException] = []
    while e is not None and all(e is not x for x in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _chain_has(e: BaseException | None, test) -> bool:
    return any(test(x) for x in _chain(e))


def _was_interrupted(e: BaseException) -> bool:
    """A Ctrl-C that reached us as another error: DuckDB's InterruptException or "Query interrupted"
    RuntimeError, or any error raised while handling one."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, KeyboardInterrupt) or type(cur).__name__ == "InterruptException":
            return True
        if isinstance(cur, RuntimeError) and str(cur).strip() == "Query interrupted":  # DuckDB, mid-query
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _usage_error(e: Exception) -> NoReturn:
    """A command-line parse error: one red line, the usage as the hint, exit 2."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":
        e.show()
        sys.exit(e.exit_code)
    hint = None
    if ctx is not None:
        usage = ctx.get_usage().removeprefix("Usage: ").strip()
        hint = f"usage: {usage} (see `{ctx.command_path} --help`)"
    _fail(e.format_message(), hint, e.exit_code)


def _system_error(e: BaseException, verbose: bool) -> NoReturn:
    """An OSError (or DuckDB I/O error) no stage turned into an MhrError: one line naming the path."""
    if verbose:
        traceback.print_exc()
    known = damaged_store_error(e) or disk_full_error(e)
    if known is not None:
        _fail(known.message, known.hint, known.exit_code)
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        message = f"{e.strerror or type(e).__name__}{where}"
    else:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    denied = getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS)
    hint = "check the permissions of that path" if denied else "rerun with --verbose for the traceback"
    _fail(message, hint, DiskError.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one red line + hint and a documented exit code for every failure a user can cause.

    MhrError -> its code; parse errors -> 2; Ctrl-C -> 130; an OSError no stage anticipated (disk
    full, permissions) -> 1 with one line (the traceback with --verbose). Anything else is a bug
    and keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or "-v" in args or os.environ.get("MHR_VERBOSE") == "1"
    ctx = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        command = typer.main.get_command(app)
        refuse_non_finite_floats(command)
        # Invoked directly rather than through typer's `main`, which turns Ctrl-C into a silent
        # exit code that non-standalone callers never see.
        with command.make_context("mhr", args) as ctx:
            command.invoke(ctx)
    except MhrError as e:
        if _was_interrupted(e):
            _interrupted(e)
        if verbose:
            traceback.print_exc()
        _fail(e.message, e.hint, e.exit_code)
    except EXITS as e:
        sys.exit(e.exit_code)
    except ABORTS as e:
        _interrupted(e)
    except CLICK_ERRORS as e:
        _usage_error(e)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except BrokenPipeError:
        # the reader of stdout went away (`mhr … | head`): nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(1)
    except Exception as e:
        if _was_interrupted(e):
            _interrupted(e)
        known = damaged_store_error(e, fallback=_store_of(ctx)) or disk_full_error(e)
        if known is not None:  # a block failing its checksum, or a full disk, mid-command in any stage
            if verbose:
                traceback.print_exc()
            _fail(known.message, known.hint, known.exit_code)
        if isinstance(e, OSError) or _is_duckdb_io(e):
            _system_error(e, verbose)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _store_of(ctx) -> Path | None:
    """The store of the dataset the command works on, when the command line names one (or there is one)."""
    obj = getattr(ctx, "obj", None)
    if not isinstance(obj, Context):
        return None
    try:
        return obj.workspace.dataset(obj.dataset_name).store_path
    except MhrError:
        return None


def _is_duckdb_io(e: BaseException) -> bool:
    duckdb = sys.modules.get("duckdb")
    return duckdb is not None and isinstance(e, duckdb.IOException)
