"""`mhr priors build` and `mhr windows build` options declared once: flags, help and the logged command
come from the parameter dataclasses (`mhr.options.option`)."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from mhr.cli import app
from mhr.cli.common import given_options
from mhr.options import field_flag, option_flags
from mhr.priors.build import make_params
from mhr.priors.kinds import KINDS
from mhr.windows import WindowsParams

PARAMS = {kind: entry.params for kind, entry in KINDS.items()}


def _command(group: str, name: str = "build"):
    return typer.main.get_command(app).commands[group].commands[name]


def _parse_prior(kind: str, *args: str):
    ctx = _command("priors").make_context("build", ["--kind", kind, *args])
    return make_params(ctx.params["kind"], given_options(PARAMS, ctx.params))


def test_every_kind_parameter_has_a_flag_with_help_and_its_default():
    options = {p.name: p for p in _command("priors").params}
    for kind, cls in PARAMS.items():
        for f in dataclasses.fields(cls):
            opt = options[f.name]
            assert field_flag(f) in opt.opts
            assert opt.default is None  # not given: the kind keeps its own default
            assert kind in opt.help and len(opt.help) > 15
            if f.default not in (None, ()):  # the default shown is the declared one
                shown = (f.metadata["show"] or str)(f.default)
                assert f"default {shown}" in opt.help or f"{kind}: {shown}" in opt.help, (f.name, opt.help)


@pytest.mark.parametrize("kind, params", [
    ("item", PARAMS["item"](categories=("A", "B"), threshold=0.3, untagged="other", map_file=None)),
    ("item", PARAMS["item"](unknown_tags=("?",), top=3, level=1)),
    ("graph", PARAMS["graph"](clusters=11, cap=50, isolated="all", seed=2)),
    ("temporal", PARAMS["temporal"](horizon=4, boundaries=(1, 4))),
    ("event", PARAMS["event"](buckets="low:1-3,high:4-5")),
    ("user", PARAMS["user"](from_attributes=("age", "gender"), bins=3)),
])
def test_logged_flags_give_back_the_parameters(kind, params):
    """What `mhr run` logs as the equivalent `mhr priors build` command builds exactly these parameters."""
    assert _parse_prior(kind, *option_flags(params)) == params
    assert _parse_prior(kind) == PARAMS[kind]()


@pytest.mark.parametrize("params", [WindowsParams(), WindowsParams(context=12, horizon=4),
                                    WindowsParams(protocol="loo"), WindowsParams(horizon=4, holdout=8)])
def test_windows_flags_give_back_the_parameters(params):
    ctx = _command("windows").make_context("build", option_flags(params))
    assert WindowsParams(**{f.name: ctx.params[f.name] for f in dataclasses.fields(WindowsParams)}) == params


def test_a_parameter_added_later_stays_out_of_the_key_at_its_default():
    from mhr.options import keyed_params, option

    @dataclasses.dataclass(frozen=True)
    class Grown:
        cap: int = option(1000, "Old.")
        per_user: int | None = option(None, "Added after keys existed.", added=True)

    assert keyed_params(Grown()) == {"cap": 1000}
    assert keyed_params(Grown(per_user=5)) == {"cap": 1000, "per_user": 5}


def test_a_value_the_declaration_refuses_names_its_flag():
    from mhr.errors import UsageError

    with pytest.raises(UsageError, match=r"--boundaries '2,x': 'x' is not an integer"):
        _parse_prior("temporal", "--boundaries", "2,x")
