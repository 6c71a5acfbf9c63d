"""Options declared once: a dataclass field that is also a command-line flag.

A stage's parameters are a frozen dataclass whose fields are declared with `option(default, help)`:
the default lives only there, the command builds its flag `--<field-name>` (with `-` for `_`) and its
help text from the field (`mhr.cli.common.dataclass_options`), and `option_flags` writes the
equivalent command line back (what `mhr run` logs). Used by `TrainParams` (`mhr train`), the prior
kinds' parameters (`mhr priors build`) and `WindowsParams` (`mhr windows build`). Imports nothing
heavy, so a parameter module stays free of torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mhr.errors import UsageError


def option(default: Any, help: str, *, aliases: tuple[str, ...] = (), panel: str | None = None,
           parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] | None = None,
           flag: str | None = None, added: bool = False, multiple: bool = False) -> Any:
    """A dataclass field that is also the command-line option `--<field-name>`.

    `aliases`: older spellings of the flag, still accepted; `panel`: the `--help` group; `parse` /
    `show`: how a value is read from and written as its flag's text, for fields whose values are
    not plain str/int/float/bool (a list, or "full" for None); `flag`: the flag when it is not
    spelled after the field (`--map` for `map_file`); `added`: a field added after artifacts had been
    keyed by these parameters, left out of the key at its default (`keyed_params`) so that no existing
    key changes; `multiple`: a repeatable flag (a tuple value), whose texts `parse` receives as a list."""
    meta = {"help": help, "aliases": aliases, "panel": panel, "parse": parse, "show": show, "flag": flag,
            "added": added, "multiple": multiple}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line flag spelled after field `name`."""
    return "--" + name.replace("_", "-")


def field_flag(f: dataclasses.Field) -> str:
    """The flag of a field declared with `option`."""
    return f.metadata.get("flag") or flag_name(f.name)


def keyed_params(params: Any) -> dict[str, Any]:
    """`dataclasses.asdict(params)` without the `added` fields that hold their default: what a stage key
    covers of parameters that grew after artifacts had been keyed."""
    out = dataclasses.asdict(params)
    for f in dataclasses.fields(params):
        if f.metadata.get("added") and getattr(params, f.name) == f.default:
            del out[f.name]
    return out


def option_flags(params: Any) -> list[str]:
    """The flags giving `params` (a dataclass of `option` fields): those that differ from the defaults."""
    out: list[str] = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if value == f.default:
            continue
        flag = field_flag(f)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif f.metadata.get("multiple"):  # a repeatable flag: --steer A --steer B
            for v in value:
                out += [flag, str(v)]
        else:
            show = f.metadata["show"] or str
            out += [flag, show(value)]
    return out


def split_names(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c'); '' -> ()."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def join_names(values: tuple) -> str:
    return ",".join(str(v) for v in values)


def split_ints(text: str) -> tuple[int, ...]:
    """'2, 8' -> (2, 8); an element that is no integer is a UsageError."""
    out = []
    for v in split_names(text):
        try:
            out.append(int(v))
        except ValueError:
            raise UsageError(f"{text!r}: {v!r} is not an integer", hint="give a comma-separated list, e.g. 2,8") from None
    return tuple(out)
