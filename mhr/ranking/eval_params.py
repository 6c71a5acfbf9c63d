"""`mhr eval`'s parameters, every option declared once (`mhr.training.params.option`), in a module
light enough for the command line to build its flags from without importing torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mhr.errors import UsageError, refuse_non_finite
from mhr.options import option, split_ints
from mhr.ranking.objectives import Objectives, objectives_from_texts, parse_boost, parse_steer


def _ints(flag: str) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            return split_ints(str(text))
        except UsageError as e:
            raise UsageError(f"{flag} {e.message}", hint=e.hint) from None
    return parse


def _show_ints(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _run_ref(text: str | None) -> str | None:
    return text.removeprefix("run:") if text else None


def _texts(parse_one: Callable[[str], Any]) -> Callable[[list[str] | None], tuple[str, ...]]:
    """A repeatable objective flag's texts, each checked and written canonically (`Steer.text`)."""
    return lambda values: tuple(parse_one(v).text() for v in (values or ()))


def _join(values: tuple[str, ...]) -> str:
    return " ".join(values)


_RANK, _OBJ, _DIAG = "Ranking", "Objectives (decoding time; any run)", "Diagnostics"


@dataclass(frozen=True)
class EvalParams:
    """Every `mhr eval` option, declared once (`mhr.training.params.option`): the CLI's flags and
    `mhr run`'s logged commands are generated from these fields."""

    fusion: str = option(
        "max", "How eligible heads' scores fuse: max (explainable), avg, learned (per-head calibration fitted on "
        "the valid split), invvar (inverse-variance weights from the valid split) or router (max over heads of "
        "log p(k | h) + log p(i | k, h); runs trained with --router).", panel=_RANK)
    ks: tuple[int, ...] = option((5, 10, 50, 200), "Cut-offs K.", aliases=("--k",), panel=_RANK,
                                 parse=_ints("--k"), show=_show_ints)
    horizons: tuple[int, ...] = option(  # () = 1, τ/2, τ
        (), "Horizons to score, e.g. 1,4,8: the first h held-out targets, h ≤ H (default 1, τ/2, τ; and H for "
        "windows built with --holdout H).", panel=_RANK, parse=_ints("--horizons"), show=_show_ints)
    split: str = option("test", "valid or test.", panel=_RANK)
    keep_history: bool = option(False, "Do not exclude already-seen items.", panel=_RANK)
    oracle_event: bool = option(False, "DIAGNOSTIC ORACLE: mask heads with the true next event type.", panel=_DIAG)
    baseline: str | None = option(None, "Baseline run for the new-interest boost.", panel=_DIAG,
                                  parse=_run_ref, show=lambda v: v)
    entropy_prior: str | None = option(  # default: the run's first item prior, else one named "item"
        None, "Item prior whose categories H@K, C_KL@K, category coverage and --diversity count (default: the "
        "run's item prior, else 'item').", panel=_RANK)
    diversity: float = option(
        0.0, "λ of ComiRec's greedy category-diversity re-ranking over the top 2K fused items (categories of "
        "--entropy-prior; 0 = plain ranking).", panel=_OBJ)
    oracle_group: str | None = option(
        None, "DIAGNOSTIC ORACLE: rank only items sharing a group of this item/graph prior with the user's first "
        "target (for a head run: routing to the target's heads; for a plain backbone: its fair control).",
        panel=_DIAG)
    sample_users: int | None = option(
        None, "Score a seeded sample of this many users of the split (the same users for every run on these "
        "windows, so runs stay paired); default: every user. For quick looks at big logs.", panel=_RANK)
    steer: tuple[str, ...] = option(
        (), "PRIOR:GROUP=SHARE (repeatable): the top K of each list, at every cut-off K of --k, holds ≥ ceil(SHARE·K) items of "
        "GROUP (a group of an item/graph prior, by name or id as `mhr priors show` lists it) where the user's "
        "candidates allow; exact for one quota, greedy for several.", panel=_OBJ, multiple=True,
        parse=_texts(parse_steer), show=_join)
    boost: tuple[str, ...] = option(
        (), "PRIOR:GROUP=BETA (repeatable): BETA added to the scores of the heads over GROUP before fusion (a "
        "head run over PRIOR), else to GROUP's items' fused scores.", panel=_OBJ, multiple=True,
        parse=_texts(parse_boost), show=_join)
    calibrate: str | None = option(
        None, "Item/graph prior: Steck's greedy calibrated re-ranking of the top 10·K towards the user's history "
        "distribution over its groups.", panel=_OBJ)
    calibrate_lambda: float = option(0.5, "λ of --calibrate: (1-λ)·Σ p(i) − λ·KL(p‖q̃) (0 = plain ranking).",
                                     panel=_OBJ)

    def objectives(self) -> Objectives:
        return objectives_from_texts(self.steer, self.boost, self.calibrate, self.calibrate_lambda)

    def check(self) -> None:
        from mhr.ranking.fusion import FITTED, FUSIONS

        refuse_non_finite(self)
        if self.fusion not in FUSIONS:
            raise UsageError(f"unknown fusion {self.fusion!r}", hint=f"use one of {', '.join(FUSIONS)}")
        if self.fusion in FITTED and self.oracle_event:
            raise UsageError(f"--fusion {self.fusion} cannot be combined with --oracle-event",
                             hint="evaluate the oracle with max or avg fusion")
        if self.split not in ("valid", "test"):
            raise UsageError(f"unknown split {self.split!r}", hint="use valid or test")
        if not self.ks or min(self.ks) < 1:
            raise UsageError("--k needs positive cut-offs, e.g. 5,10,50,200")
        if self.oracle_group is not None and self.oracle_event:
            raise UsageError("--oracle-group and --oracle-event are two different oracles", hint="use one")
        if self.diversity < 0:
            raise UsageError("--diversity must be >= 0", hint="0 is the plain ranking; ComiRec used 0..1")
        if self.sample_users is not None and self.sample_users < 1:
            raise UsageError("--sample-users must be ≥ 1", hint="leave it out to score every user of the split")
        objectives = self.objectives()
        objectives.check()
        if self.diversity and objectives.reranks:
            raise UsageError("--diversity and --steer/--calibrate are re-rankings of one list", hint="use one")
