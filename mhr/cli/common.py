"""What every command shares: the workspace/dataset context and option helpers."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from rich.markup import escape

from mhr.errors import UsageError
from mhr.options import field_flag
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


def flags_given(ctx: Any, names: list[str]) -> list[str]:
    """The flags among the parameters `names` of the running command that the user gave (on the
    command line or through an environment variable), as `--flag-name`."""
    out = []
    for name in names:
        try:
            source = ctx.get_parameter_source(name)
        except (AttributeError, KeyError):
            continue
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            out.append("--" + name.replace("_", "-"))
    return out


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
            if cast is float and not math.isfinite(out[-1]):
                raise ValueError(v)
        except ValueError:
            kind = {int: "an integer", float: "a finite number"}.get(cast, getattr(cast, "__name__", "valid"))
            option = _option_given(value) or "the option"
            raise UsageError(f"{option} {value!r}: {v.strip()!r} is not {kind}",
                             hint="give a comma-separated list, e.g. 5,10,50") from None
    return out


def finite(value: float | None, flag: str = "the option") -> float | None:
    """`value` unless it is NaN or ±inf (which every range check lets through: `nan < 0` is False)."""
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} {value}: not a finite number", hint="give an ordinary number, e.g. 0.5")
    return value


def refuse_non_finite_floats(command: Any) -> None:
    """Give every float option of `command` and its subcommands the `finite` check, once at start-up:
    click's FLOAT type reads "nan" and "inf" as numbers, and no option should take them."""
    for param in getattr(command, "params", ()):
        if is_float_option(param) and not getattr(param, "_finite", False):
            param.callback = _finite_callback(param.callback, (getattr(param, "opts", None) or [param.name])[0])
            param._finite = True
    for sub in getattr(command, "commands", {}).values():
        refuse_non_finite_floats(sub)


def is_float_option(param: Any) -> bool:
    """A click/typer parameter that reads floats (float, float | None, list[float])."""
    desc = getattr(param, "type_descriptor", None)  # typer ≥ 0.29 keeps the annotation, not a click type
    if desc is not None:
        annotation = desc.annotation
        return annotation is float or float in typing.get_args(annotation)
    return getattr(getattr(param, "type", None), "name", "") in ("float", "float range")


def _finite_callback(previous: Callable | None, flag: str) -> Callable:
    def check(ctx: Any, param: Any, value: Any) -> Any:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            finite(v, flag)
        return previous(ctx, param, value) if previous is not None else value

    return check


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


def dataclass_options(cls: type) -> list[inspect.Parameter]:
    """One typer option per field of the dataclass `cls` declared with `mhr.options.option`:
    `--<field-name>` (`--x/--no-x` for a bool) plus its aliases, its help text and `--help` panel, and
    the field's own default (as its flag's text where the field has `show`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, field_flag(f)
        annotation, default = hints[f.name], f.default
        if meta.get("multiple"):
            annotation, default = list[str], None
        elif meta["parse"]:
            annotation, default = str, meta["show"](f.default)
        elif annotation is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        option = typer.Option(default, flag, *meta["aliases"], help=meta["help"], rich_help_panel=meta["panel"])
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return out


def union_options(classes: dict[str, type]) -> list[inspect.Parameter]:
    """One typer option per field name of several dataclasses (`mhr priors build`: every kind's
    parameters), each `None` when not given so the chosen class keeps its own default. The help text
    is the first declaration's plus, generated, the classes it applies to and their defaults; the
    `--help` panel groups the options by the classes they apply to."""
    owners: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for label, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append((label, f, hints[f.name]))
    out = []
    for name, decls in owners.items():
        _, f, annotation = decls[0]
        meta, flag, labels = f.metadata, field_flag(f), [label for label, _, _ in decls]
        if meta["parse"]:
            annotation = str
        elif annotation is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        help_text = f"{meta['help']} {escape(_defaults(decls))}"
        option = typer.Option(None, flag, *meta["aliases"], help=help_text,
                              rich_help_panel=" / ".join(labels) + " options")
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                     annotation=annotation | None))
    return out


def _defaults(decls: list[tuple[str, dataclasses.Field, Any]]) -> str:
    """'[graph, user; default 16]', '[graph: 1000, user: 2000]' or '[item]' (no default: not set)."""
    def shown(f: dataclasses.Field) -> str | None:
        if f.default is None or f.default == ():
            return None
        return (f.metadata["show"] or str)(f.default)

    values = [(label, shown(f)) for label, f, _ in decls]
    labels = ", ".join(label for label, _ in values)
    distinct = {v for _, v in values}
    if distinct == {None}:
        return f"[{labels}]"
    if len(distinct) == 1:
        return f"[{labels}; default {values[0][1]}]"
    return "[" + ", ".join(f"{label}: {v or 'not set'}" for label, v in values) + "]"


def given_options(classes: dict[str, type], values: dict) -> dict[str, Any]:
    """The options of `union_options` that were given, parsed as their first declaration says (a value
    its parser refuses is a UsageError naming the flag)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in classes.values():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f)
    out = {}
    for name, value in values.items():
        if name not in fields or value is None:
            continue
        parse = fields[name].metadata["parse"]
        try:
            out[name] = parse(value) if parse else value
        except UsageError as e:
            raise UsageError(f"{field_flag(fields[name])} {e.message}", hint=e.hint) from None
    return out


def from_options(cls: type, values: dict) -> Any:
    """An instance of `cls` from the values of its `dataclass_options` (as typer parsed them)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        parse = f.metadata["parse"]
        kwargs[f.name] = parse(values[f.name]) if parse else values[f.name]
    return cls(**kwargs)


def with_options(command: Callable, options: list[inspect.Parameter]) -> Callable:
    """`command(ctx, <its own options>, **values)` with `options` added to what typer sees, after ctx."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
    first = next(iter(sig.parameters.values()))
    command.__signature__ = sig.replace(parameters=[first, *options, *own])
    return command
