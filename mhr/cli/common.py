"""What every command shares: the workspace/dataset context and option helpers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import typer

from mhr.errors import UsageError
from mhr.workspace import Dataset, Workspace


@dataclass(frozen=True)
class Context:
    """Set once by the root callback from --workspace/--dataset/--verbose; passed, never global."""

    workspace: Workspace
    dataset_name: str | None
    verbose: bool

    def dataset(self, name: str | None = None) -> Dataset:
        """The dataset to work on (must exist)."""
        return self.workspace.dataset(name or self.dataset_name).require()

    def new_dataset(self, name: str | None) -> Dataset:
        """A dataset that a data command is about to create (may exist: it is replaced atomically)."""
        return self.workspace.dataset(name or self.dataset_name)


def context(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context), "root callback did not run"
    return obj


def run_name(ref: str | None) -> str | None:
    """A run as given on the command line, `NAME` or `run:NAME` (what `mhr train` prints) -> NAME."""
    return ref.split(":", 1)[1] if ref and ref.startswith("run:") else ref


def parse_list(value: str | None, cast=str) -> list:
    """'a,b, c' -> ['a', 'b', 'c'] (empty or None -> []); an element `cast` refuses is a UsageError."""
    if not value:
        return []
    out = []
    for v in value.split(","):
        if not v.strip():
            continue
        try:
            out.append(cast(v.strip()))
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(cast, getattr(cast, "__name__", "valid"))
            option = _option_given(value) or "the option"
            raise UsageError(f"{option} {value!r}: {v.strip()!r} is not {kind}",
                             hint="give a comma-separated list, e.g. 5,10,50") from None
    return out


def _option_given(value: str) -> str | None:
    """The name of the option of the running command that holds `value` (for messages)."""
    ctx = None
    for module in ("typer._click.globals", "click.globals"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            break
    if ctx is None:
        return None
    for param in ctx.command.params:
        if ctx.params.get(param.name) == value and getattr(param, "opts", None):
            return param.opts[0]
    return None
