"""Training options declared once: `mhr train`'s flags, help and defaults come from `TrainParams`."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from mhr.cli import app
from mhr.cli.common import from_options
from mhr.errors import UsageError
from mhr.models.multihead import DecoderOptions
from mhr.options import flag_name, option_flags
from mhr.training.params import RUN_KEY_RULES, KeyRule, TrainParams


def _train_command():
    return typer.main.get_command(app).commands["train"]


def _parse(*args: str) -> TrainParams:
    """The parameters `mhr train ARGS` would train with (parsed by the real command, nothing run)."""
    ctx = _train_command().make_context("train", list(args))
    return from_options(TrainParams, ctx.params)


def test_every_field_has_a_flag_named_after_it_with_help():
    options = {p.name: p for p in _train_command().params}
    for f in dataclasses.fields(TrainParams):
        assert f.name in options, f"TrainParams.{f.name} has no `mhr train` option"
        assert flag_name(f.name) in options[f.name].opts, f"--{f.name} is not spelled after its field"
        assert len(options[f.name].help) > 10, f"{flag_name(f.name)} has no help text"


def test_every_cli_default_is_the_dataclass_default():
    assert _parse() == TrainParams()
    options = {p.name: p for p in _train_command().params}
    for f in dataclasses.fields(TrainParams):
        parse = f.metadata["parse"]
        cli_default = options[f.name].default
        assert (parse(cli_default) if parse else cli_default) == f.default, f.name


def test_old_flag_spellings_still_work():
    p = _parse("--global-negatives-ratio", "0.25", "--item-pooling", "last")
    assert p.global_ratio == 0.25 and p.pooling == "last"
    assert _parse("--global-ratio", "0.25", "--pooling", "last") == p


@pytest.mark.parametrize("params", [
    TrainParams(),
    TrainParams(priors=("item", "temporal"), compose="additive", negatives=256, logq=False, lr=0.002, seed=3),
    TrainParams(decoder="remi", interests=8, negatives=64, beta=1.0, routing_reg=10.0, max_steps=7, dropout=0.0),
    TrainParams(backbone="hllm", text_cols=("title",), pooling="last", negatives=32, train_item_llm=True),
    TrainParams(priors=("item",), router=True, router_weight=0.5, global_head=True, in_batch_negatives=True,
                negatives=16, negatives_per="sequence", global_ratio=0.1),
])
def test_flags_give_back_the_parameters(params):
    """What `mhr run` logs as the equivalent `mhr train` command trains exactly these parameters."""
    assert _parse(*option_flags(params)) == params


def test_negatives_text_is_parsed_and_checked():
    assert _parse("--negatives", "full").negatives is None
    assert _parse("--negatives", "12").negatives == 12
    with pytest.raises(UsageError, match="neither 'full' nor a positive count"):
        _parse("--negatives", "many")
    with pytest.raises(UsageError, match="must be 'full' or a positive count"):
        _parse("--negatives", "0").check()


def test_train_item_llm_without_hllm_is_refused_by_check():
    with pytest.raises(UsageError, match="fine-tunes HLLM's item LLM"):
        TrainParams(train_item_llm=True, negatives=8).check()


def test_baseline_defaults_are_the_decoders_own():
    """A model built without options and a run trained without flags decode alike."""
    own = DecoderOptions()
    assert TrainParams().decoder_options() == own


def test_run_key_rules_name_real_fields_and_historical_values_are_valid():
    names = {f.name for f in dataclasses.fields(TrainParams)}
    assert set(RUN_KEY_RULES) <= names
    # a configuration at every historical value keys (and reads back) as before the fields existed
    historical = {n: r.historical for n, r in RUN_KEY_RULES.items() if r.historical is not KeyRule().historical}
    p = TrainParams(negatives=8, **historical)
    assert not set(historical) & set(p.as_dict())
    assert TrainParams.from_record(p.as_dict()) == p
