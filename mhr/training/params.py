"""The training parameters: every option declared once, with its help text and its run-key rule.

`TrainParams` holds everything that decides the trained weights. Each field is declared with
`mhr.options.option(default, help)`: the default lives only here, `mhr train` builds its flag `--<field-name>`
(with `-` for `_`) and help text from the field, and `mhr run` logs the same flags. Fields added
after runs had been keyed are listed once in `RUN_KEY_RULES`, which both the run key (`as_dict`)
and the reading of a run's record (`from_record`) follow, so no cached run changes key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mhr.errors import UsageError, refuse_non_finite
from mhr.options import join_names, option, split_names


def parse_negatives(text: str) -> int | None:
    """'full' -> None (every item of each head's group); 'N' -> N sampled negatives."""
    text = str(text).strip()
    if text == "full":
        return None
    if text.lstrip("-").isdigit():
        return int(text)  # a count below 1 is refused by `TrainParams.check`
    raise UsageError(f"--negatives {text!r} is neither 'full' nor a positive count", hint="e.g. --negatives 256")


def show_negatives(value: int | None) -> str:
    return "full" if value is None else str(value)


_MODEL, _LOSS, _SAMPLED, _SCHEDULE, _BASELINES, _HLLM = (
    "Model", "Loss", "Sampled negatives", "Schedule", "Baselines (--decoder)", "HLLM (--backbone hllm)")


@dataclass(frozen=True)
class TrainParams:
    """Everything that decides the trained weights (and so the run's key)."""

    backbone: str = option("hstu", "Backbone: hstu, sasrec or hllm.", panel=_MODEL)
    size: str = option("1", "Backbone size: tiny, 1, 2, 3, 4, 1b (paper Table 5).", panel=_MODEL)
    priors: tuple[str, ...] = option(
        (), "Comma-separated built priors, e.g. item,temporal ('' = plain backbone); random:K / all:K are "
        "made on the fly (K random groups / K heads over every item).", panel=_MODEL, parse=split_names,
        show=join_names)
    compose: str = option("hierarchical", "How several priors combine: flat, additive, multiplicative, "
                          "hierarchical.", panel=_MODEL)
    global_head: bool = option(False, "Keep the backbone's own state as an extra head over all items.",
                               panel=_MODEL)
    score: str = option("cosine", "cosine (shared learnable temperature) or dot.", panel=_MODEL)
    temperature: float = option(0.05, "Initial temperature of cosine scores.", panel=_MODEL)
    negatives: int | None = option(
        None, "'full' softmax over each head's group, or N sampled negatives.", panel=_SAMPLED,
        parse=parse_negatives, show=show_negatives)
    negatives_from: str = option("group", "Draw negatives from the head's group or the global pool.",
                                 panel=_SAMPLED)
    global_ratio: float = option(0.0, "Share of each head's negatives from the whole catalogue.",
                                 aliases=("--global-negatives-ratio",), panel=_SAMPLED)
    # the sampled softmax chosen on validation (README "Large catalogues"): one uniform draw per
    # position, logQ-corrected; runs keyed before these fields existed read back as RUN_KEY_RULES say
    negatives_per: str = option(
        "position", "Sampled negatives: one draw per batch (shared by all positions), per sequence, or per "
        "position (HSTU's reference sampler).", panel=_SAMPLED)
    in_batch_negatives: bool = option(
        False, "Sampled negatives: also use the batch's own targets as negatives (popularity-shaped).",
        panel=_SAMPLED)
    logq: bool = option(
        True, "Sampled negatives: correct each negative's logit by -log(expected copies), so the sampled sum "
        "estimates the full softmax (needed with --in-batch-negatives).", panel=_SAMPLED)
    router: bool = option(False, "Train a router p(k | h) over the heads jointly; rank with "
                          "`mhr eval --fusion router`.", panel=_LOSS)
    router_weight: float = option(1.0, "Weight of the router's loss beside the heads' loss.", panel=_LOSS)
    head_weights: str = option("frequency", "frequency (w_k ∝ |Y_k|) or uniform.", panel=_LOSS)
    gamma: float = option(0.99, "Discount γ over the forecast horizon.", panel=_LOSS)
    epochs: int = option(20, "Epoch budget.", panel=_SCHEDULE)
    max_steps: int | None = option(None, "Step budget (overrides --epochs).", panel=_SCHEDULE)
    batch_size: int = option(64, "Global batch size (windows per step).", panel=_SCHEDULE)
    lr: float = option(1e-3, "AdamW learning rate (warmup then cosine decay).", panel=_SCHEDULE)
    weight_decay: float = option(0.0, "AdamW weight decay.", panel=_SCHEDULE)
    sparse_embeddings: bool = option(
        False, "Row-sparse gradients for the item table, updated by a lazy Adam (only the rows a step "
        "touched; not dense Adam): the step stops growing with the catalogue. Needs --negatives N; "
        "hstu/sasrec with prior heads.", panel=_SCHEDULE)
    warmup_steps: int = option(50, "Linear warmup steps.", panel=_SCHEDULE)
    clip: float = option(1.0, "Gradient-norm clipping (0 = off).", panel=_SCHEDULE)
    eval_every: int = option(0, "Validate every N steps (0 = once per epoch).", panel=_SCHEDULE)
    patience: int = option(3, "Stop after N validations without a better NDCG@10 (0 = never).",
                           panel=_SCHEDULE)
    valid_users: int | None = option(
        None, "Validate (early stopping, best weights) on a seeded sample of this many users of the valid "
        "split instead of all of them: on big logs a full validation takes longer than the training.",
        panel=_SCHEDULE)
    seed: int = option(0, "Seed of initialisation, batch order and negative sampling.", panel=_SCHEDULE)
    dropout: float | None = option(None, "Override the size's dropout.", panel=_MODEL)
    # the baselines' settings; `mhr.models.multihead.DecoderOptions` (what a model is built with) starts from
    # the same values, which tests/test_train_params.py holds together (this module imports no torch,
    # so `mhr --help` stays fast)
    decoder: str = option(
        "heads", "heads (prior-conditioned, the method) or a baseline: comirec (ComiRec-SA), remi "
        "(ComiRec-SA + routing regularisation + hard negatives), dualvae.", panel=_BASELINES)
    interests: int = option(4, "Baselines: number of interests / aspects K.", panel=_BASELINES)
    routing_reg: float | None = option(None, "comirec/remi: routing regularisation λ "
                                       "(remi default 100).", panel=_BASELINES)
    beta: float = option(0.0, "Hard-negative weighting β of sampled negatives (REMI; needs --negatives N).",
                         panel=_BASELINES)
    kl_weight: float = option(0.2, "dualvae: weight of the KL term (reached after "
                              "--kl-anneal-steps).", panel=_BASELINES)
    kl_anneal_steps: int = option(1000, "dualvae: linear KL annealing steps.",
                                  panel=_BASELINES)
    contrast_weight: float = option(0.1, "dualvae: weight of the contrastive neighbour "
                                    "term.", panel=_BASELINES)
    item_llm: str = option("minilm", "hllm: item encoder (path or hub name; 'minilm' = bundled, offline).",
                           panel=_HLLM)
    user_llm: str = option("tiny", "hllm: user decoder (path or hub name; 'tiny' = small Llama from scratch).",
                           panel=_HLLM)
    text_cols: tuple[str, ...] = option(("title", "tags", "text"), "hllm: item text fields (columns or attrs "
                                        "keys).", panel=_HLLM, parse=split_names, show=join_names)
    max_text_len: int = option(256, "hllm: tokens per item text.", panel=_HLLM)
    pooling: str = option("mean", "hllm: item embedding by mean pooling or an appended token.",
                          aliases=("--item-pooling",), panel=_HLLM)
    train_item_llm: bool = option(False, "hllm: fine-tune the item LLM end to end (needs --negatives N; slow "
                                  "without a GPU).", panel=_HLLM)

    def __post_init__(self) -> None:
        if self.train_item_llm and self.negatives is not None:
            # a fine-tuned item LLM encodes exactly one shared draw per batch (see `step.LossStep`)
            object.__setattr__(self, "negatives_per", "batch")
            object.__setattr__(self, "logq", False)
            object.__setattr__(self, "in_batch_negatives", False)

    def check(self) -> None:
        """Every check of the parameters on their own (the data's are made by `train`)."""
        _check_choices(self)
        _check_ranges(self)
        _check_combinations(self)

    def as_dict(self) -> dict[str, Any]:
        """The parameters as the run key and config.json hold them: lists for tuples, and without
        the fields `RUN_KEY_RULES` leaves out for this configuration."""
        d = dataclasses.asdict(self)
        d["priors"] = list(self.priors)
        d["text_cols"] = list(self.text_cols)
        for name, rule in RUN_KEY_RULES.items():
            if rule.left_out(self, d[name]):
                del d[name]
        return d

    @classmethod
    def from_record(cls, params: dict[str, Any]) -> TrainParams:
        """The parameters a run was trained with, from its config.json's `params` (as `as_dict`
        wrote them, at any version): a field a record lacks reads back as its historical value."""
        p = {**{name: r.historical for name, r in RUN_KEY_RULES.items() if r.historical is not _NONE}, **params}
        if p.get("negatives") is None:  # a full softmax samples nothing: its sampler options are moot
            for name in ("negatives_per", "logq", "in_batch_negatives"):
                p[name] = cls.__dataclass_fields__[name].default
        p["priors"] = tuple(p["priors"])
        if "text_cols" in p:
            p["text_cols"] = tuple(p["text_cols"])
        return cls(**p)

    def decoder_options(self) -> Any:
        """The `mhr.models.multihead.DecoderOptions` the model is built with."""
        from mhr.models.multihead import DecoderOptions

        return DecoderOptions(self.decoder, self.interests, self.routing_reg, self.kl_weight,
                              self.kl_anneal_steps, self.contrast_weight)


# ---------------------------------------------------------------------------------------------
# run-key compatibility


_NONE = object()


@dataclass(frozen=True)
class KeyRule:
    """When a field is left out of the run key (and of config.json's params).

    `historical`: the value every run had before the field existed: left out at that value (so no
    earlier run changes key), and what a record without the field is read back with (not a newer
    default). `applies`: the configurations the field means anything in; it is left out elsewhere."""

    historical: Any = _NONE
    applies: Callable[[TrainParams], bool] = lambda p: True

    def left_out(self, p: TrainParams, value: Any) -> bool:
        return not self.applies(p) or (self.historical is not _NONE and value == self.historical)


def _hllm(p: TrainParams) -> bool:
    return p.backbone == "hllm"


def _sampled(p: TrainParams) -> bool:
    return p.negatives is not None


def _decoders(*names: str) -> Callable[[TrainParams], bool]:
    return lambda p: p.decoder in names


RUN_KEY_RULES: dict[str, KeyRule] = {
    # the sampler's options: earlier runs drew one shared, uncorrected sample per batch; a full
    # softmax draws nothing
    "negatives_per": KeyRule("batch", _sampled),
    "in_batch_negatives": KeyRule(False, _sampled),
    "logq": KeyRule(False, _sampled),
    "router": KeyRule(False),
    "sparse_embeddings": KeyRule(False),  # earlier runs: dense AdamW over the whole item table
    "valid_users": KeyRule(None),  # earlier runs validated on every user
    "router_weight": KeyRule(applies=lambda p: p.router),
    # the baselines: earlier runs were all prior heads
    "decoder": KeyRule("heads"),
    "interests": KeyRule(applies=_decoders("comirec", "remi", "dualvae")),
    "routing_reg": KeyRule(applies=_decoders("comirec", "remi")),
    "beta": KeyRule(applies=lambda p: p.decoder in ("comirec", "remi", "dualvae") or p.beta != 0),
    "kl_weight": KeyRule(applies=_decoders("dualvae")),
    "kl_anneal_steps": KeyRule(applies=_decoders("dualvae")),
    "contrast_weight": KeyRule(applies=_decoders("dualvae")),
    # HLLM's settings; earlier HLLM runs kept the item LLM frozen
    "item_llm": KeyRule(applies=_hllm),
    "user_llm": KeyRule(applies=_hllm),
    "text_cols": KeyRule(applies=_hllm),
    "max_text_len": KeyRule(applies=_hllm),
    "pooling": KeyRule(applies=_hllm),
    "train_item_llm": KeyRule(False, _hllm),
}


# ---------------------------------------------------------------------------------------------
# checks


def _one_of(value: str, choices: tuple[str, ...] | dict, what: str) -> None:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}", hint=f"use one of {', '.join(choices)}")


def _check_choices(p: TrainParams) -> None:
    from mhr.models.heads import COMPOSITIONS
    from mhr.models.multihead import BACKBONES, DECODERS

    _one_of(p.backbone, BACKBONES, "backbone")
    _one_of(p.compose, COMPOSITIONS, "composition")
    _one_of(p.head_weights, ("frequency", "uniform"), "--head-weights")
    _one_of(p.negatives_from, ("group", "global"), "--negatives-from")
    _one_of(p.score, ("cosine", "dot"), "--score")
    _one_of(p.decoder, DECODERS, "--decoder")
    _one_of(p.negatives_per, ("batch", "sequence", "position"), "--negatives-per")


def _check_ranges(p: TrainParams) -> None:
    refuse_non_finite(p)  # nan/inf slip past every comparison below
    if not 0.0 <= p.global_ratio <= 1.0:
        raise UsageError("--global-ratio must be in [0, 1]")
    if p.batch_size < 1 or p.epochs < 1 or p.lr <= 0:
        raise UsageError("--batch-size, --epochs and --lr must be positive")
    if p.valid_users is not None and p.valid_users < 1:
        raise UsageError(f"--valid-users {p.valid_users} must be at least 1",
                         hint="leave --valid-users out to validate on every user")
    if p.max_steps is not None and p.max_steps < 1:
        raise UsageError(f"--max-steps {p.max_steps} must be at least 1", hint="leave --max-steps out to train for --epochs")
    if not 0 <= p.seed < 2**63:
        raise UsageError(f"--seed {p.seed} must be in [0, 2^63)")
    if p.temperature <= 0 or p.warmup_steps < 0 or p.eval_every < 0 or p.patience < 0:
        raise UsageError("--temperature must be positive; --warmup-steps, --eval-every and --patience >= 0")
    if p.negatives is not None and p.negatives < 1:
        raise UsageError(f"--negatives {p.negatives} must be 'full' or a positive count")
    if p.clip < 0 or p.weight_decay < 0:
        raise UsageError("--clip and --weight-decay must be >= 0", hint="--clip 0 turns clipping off")
    if p.decoder != "heads" and p.interests < 1:
        raise UsageError("--interests must be at least 1")
    if p.beta < 0:
        raise UsageError("--beta must be >= 0")
    if p.kl_weight < 0 or p.contrast_weight < 0 or p.kl_anneal_steps < 0:
        raise UsageError("--kl-weight, --contrast-weight and --kl-anneal-steps must be >= 0")
    if p.routing_reg is not None and p.routing_reg < 0:
        raise UsageError("--routing-reg must be >= 0")
    if p.router_weight < 0:
        raise UsageError("--router-weight must be a finite number >= 0")
    if not 0 <= p.gamma <= 1:
        raise UsageError(f"--gamma {p.gamma} must be in [0, 1]", hint="γ discounts later horizons; 0.99 is the default")


def _check_combinations(p: TrainParams) -> None:
    if p.compose == "flat" and len(p.priors) > 1:
        raise UsageError("--compose flat takes one prior", hint="use additive, multiplicative or hierarchical")
    twice = sorted({n for n in p.priors if p.priors.count(n) > 1})
    if twice:
        raise UsageError(f"--priors names {', '.join(twice)} more than once", hint="list each prior once")
    if p.decoder != "heads" and p.priors:
        raise UsageError(f"--decoder {p.decoder} learns its own interests and takes no --priors",
                         hint="drop --priors (or use --decoder heads)")
    if p.decoder != "heads" and p.global_head:
        raise UsageError(f"--decoder {p.decoder} has no global head", hint="drop --global-head")
    if p.negatives is None and (p.negatives_per != "position" or not p.logq):
        given = ", ".join(f for f, on in (("--negatives-per " + p.negatives_per, p.negatives_per != "position"),
                                          ("--no-logq", not p.logq)) if on)
        raise UsageError(f"{given} shapes a sampled softmax, and without --negatives the full softmax samples nothing",
                         hint="add --negatives N, e.g. --negatives 256, or drop it")
    if p.negatives is None and p.in_batch_negatives:
        raise UsageError("--in-batch-negatives shapes a sampled softmax", hint="add --negatives N, e.g. --negatives 256")
    if p.router and p.decoder != "heads":
        raise UsageError("--router routes between prior heads", hint="drop --router or use --decoder heads")
    if p.router and not p.priors:
        raise UsageError("--router needs heads to route between", hint="add --priors (e.g. --priors item)")
    if p.beta and p.in_batch_negatives:
        raise UsageError("--beta reweights uniform negatives only", hint="drop --in-batch-negatives")
    if p.beta and p.negatives is None:
        raise UsageError("--beta reweights sampled negatives (REMI's hard negatives)",
                         hint="add --negatives N, e.g. --negatives 256")
    if p.sparse_embeddings and (p.negatives is None or p.backbone == "hllm" or p.decoder != "heads"):
        raise UsageError("--sparse-embeddings needs a sampled softmax over an hstu/sasrec item table with "
                         "prior heads", hint="add --negatives N (e.g. 256), or drop --sparse-embeddings")
    if p.train_item_llm and p.backbone != "hllm":
        raise UsageError("--train-item-llm fine-tunes HLLM's item LLM", hint="add --backbone hllm")
    if p.train_item_llm and p.negatives is None:
        raise UsageError("--train-item-llm needs sampled negatives: a full softmax would re-encode every item "
                         "each step", hint="add --negatives N, e.g. --negatives 256")


def default_run_name(p: TrainParams) -> str:
    priors = "_".join(n.replace(":", "") for n in p.priors) if p.priors else "base"
    if p.decoder != "heads":
        priors = f"{p.decoder}{p.interests}"
    comp = f"-{p.compose[:4]}" if len(p.priors) > 1 else ""
    glob = "-g" if p.global_head else ""
    ft = "-ft" if p.train_item_llm else ""
    return f"{p.backbone}{p.size}{ft}-{priors}{comp}{glob}-s{p.seed}"
