"""One training loop for every backbone and head layout.

`train()` is the stage: windows + priors + parameters → `runs/<name>/` holding `config.json`
(everything needed to rebuild the model), `model.safetensors` (the best weights on validation
NDCG@10), `log.jsonl`, `checkpoint/` (weights, optimizer, scheduler and RNG state, no pickles) and
`manifest.json` written last. A run with the same key is skipped; `resume=True` continues from the
last checkpoint and ends bit-identical to an uninterrupted run on CPU, because every source of
randomness (batch order, dropout, negative sampling) is either derived from (seed, epoch) or
restored from the checkpoint.

Distributed: under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) each process takes every N-th
row of the same global batch and DistributedDataParallel averages gradients; only rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mhr.cache import file_sha256, is_done, lock_path, locked, stage_key, write_manifest
from mhr.console import err, progress
from mhr.errors import InputError, NotFoundError, StaleError, TrainingError, UsageError
from mhr.loss import multihead_loss, router_loss, sample_negatives
from mhr.models.heads import (
    COMPOSITIONS,
    Compatibility,
    HeadLayout,
    PriorHeads,
    SelectedQueries,
    build_layout,
    dot_scores,
)
from mhr.models.multihead import (
    BACKBONES,
    DECODERS,
    DecoderOptions,
    MultiHeadRecommender,
    backbone_config,
    build_model,
    interest_layout,
    refresh_eligibility,
)
from mhr.priors.spec import PriorSpec, load_prior
from mhr.priors.synthetic import is_synthetic, synthetic_prior
from mhr.ranking.inference import rank_split
from mhr.ranking.metrics import ndcg_at_k
from mhr.store import connect, data_key
from mhr.windows import WindowsRef, horizon_targets, load_windows
from mhr.workspace import Dataset, check_name

RUN_FORMAT = 1
HLLM_FIELDS = ("item_llm", "user_llm", "text_cols", "max_text_len", "pooling", "train_item_llm")
# decoder settings, each kept in the run key only for the decoders that read it
DECODER_FIELDS = {
    "interests": ("comirec", "remi", "dualvae"),
    "routing_reg": ("comirec", "remi"),
    "beta": ("comirec", "remi", "dualvae"),
    "kl_weight": ("dualvae",),
    "kl_anneal_steps": ("dualvae",),
    "contrast_weight": ("dualvae",),
}


_DECODER = DecoderOptions()

# Fields added after runs had been keyed: each is left out of the run key while it holds the value
# every earlier run had, so no cached run changes key, and a config written before the field
# existed is read back with that value (not with a newer default).
LEGACY_VALUES: dict[str, Any] = {
    "negatives_per": "batch",
    "in_batch_negatives": False,
    "logq": False,
    "router": False,
}
# ... and these only mean something with sampled negatives: left out of a full-softmax run's key
SAMPLED_ONLY = ("negatives_per", "in_batch_negatives", "logq")
_FLAGS = {"global_ratio": "global_negatives_ratio", "pooling": "item_pooling"}  # field -> CLI option


@dataclass(frozen=True)
class TrainParams:
    """Everything that decides the trained weights (and so the run's key)."""

    backbone: str = "hstu"
    size: str = "1"
    priors: tuple[str, ...] = ()
    compose: str = "hierarchical"
    global_head: bool = False
    score: str = "cosine"
    temperature: float = 0.05
    negatives: int | None = None
    negatives_from: str = "group"
    global_ratio: float = 0.0
    # the sampled softmax chosen on validation (README "Large catalogues"): one uniform draw per
    # position, logQ-corrected; runs keyed before these fields existed read back as LEGACY_VALUES
    negatives_per: str = "position"
    in_batch_negatives: bool = False
    logq: bool = True
    router: bool = False
    router_weight: float = 1.0
    head_weights: str = "frequency"
    gamma: float = 0.99
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    clip: float = 1.0
    eval_every: int = 0
    patience: int = 3
    seed: int = 0
    dropout: float | None = None
    # baselines (`decoder` other than "heads"; left out of the key of the prior heads); the
    # defaults are DecoderOptions' own, so they are written once
    decoder: str = _DECODER.name
    interests: int = _DECODER.interests
    routing_reg: float | None = _DECODER.routing_reg
    beta: float = 0.0
    kl_weight: float = _DECODER.kl_weight
    kl_anneal_steps: int = _DECODER.kl_anneal_steps
    contrast_weight: float = _DECODER.contrast_weight
    # HLLM only (left out of the key of other backbones)
    item_llm: str = "minilm"
    user_llm: str = "tiny"
    text_cols: tuple[str, ...] = ("title", "tags", "text")
    max_text_len: int = 256
    pooling: str = "mean"
    train_item_llm: bool = False

    def __post_init__(self) -> None:
        if self.train_item_llm and self.negatives is not None:
            # a fine-tuned item LLM encodes exactly one shared draw per batch (see `_LossStep`)
            object.__setattr__(self, "negatives_per", "batch")
            object.__setattr__(self, "logq", False)
            object.__setattr__(self, "in_batch_negatives", False)

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise UsageError(f"unknown backbone {self.backbone!r}", hint=f"use one of {', '.join(BACKBONES)}")
        if self.compose not in COMPOSITIONS:
            raise UsageError(f"unknown composition {self.compose!r}", hint=f"use one of {', '.join(COMPOSITIONS)}")
        if self.compose == "flat" and len(self.priors) > 1:
            raise UsageError("--compose flat takes one prior", hint="use additive, multiplicative or hierarchical")
        if self.head_weights not in ("frequency", "uniform"):
            raise UsageError(f"unknown --head-weights {self.head_weights!r}", hint="use frequency or uniform")
        if self.negatives_from not in ("group", "global"):
            raise UsageError(f"unknown --negatives-from {self.negatives_from!r}", hint="use group or global")
        if self.score not in ("cosine", "dot"):
            raise UsageError(f"unknown --score {self.score!r}", hint="use cosine or dot")
        if not 0.0 <= self.global_ratio <= 1.0:
            raise UsageError("--global-negatives-ratio must be in [0, 1]")
        for f in dataclasses.fields(self):  # nan/inf slip past every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{_FLAGS.get(f.name, f.name).replace('_', '-')} {value} is not a finite number")
        if self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise UsageError("--batch-size, --epochs and --lr must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps {self.max_steps} must be at least 1",
                             hint="leave --max-steps out to train for --epochs")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed {self.seed} must be in [0, 2^63)")
        if self.temperature <= 0 or self.warmup_steps < 0 or self.eval_every < 0 or self.patience < 0:
            raise UsageError("--temperature must be positive; --warmup-steps, --eval-every and --patience >= 0")
        if self.negatives is not None and self.negatives < 1:
            raise UsageError(f"--negatives {self.negatives} must be 'full' or a positive count")
        if self.clip < 0 or self.weight_decay < 0:
            raise UsageError("--clip and --weight-decay must be >= 0", hint="--clip 0 turns clipping off")
        twice = sorted({n for n in self.priors if self.priors.count(n) > 1})
        if twice:
            raise UsageError(f"--priors names {', '.join(twice)} more than once", hint="list each prior once")
        if self.decoder not in DECODERS:
            raise UsageError(f"unknown --decoder {self.decoder!r}", hint=f"use one of {', '.join(DECODERS)}")
        if self.decoder != "heads":
            if self.priors:
                raise UsageError(f"--decoder {self.decoder} learns its own interests and takes no --priors",
                                 hint="drop --priors (or use --decoder heads)")
            if self.global_head:
                raise UsageError(f"--decoder {self.decoder} has no global head", hint="drop --global-head")
            if self.interests < 1:
                raise UsageError("--interests must be at least 1")
        if self.beta < 0:
            raise UsageError("--beta must be >= 0")
        if self.kl_weight < 0 or self.contrast_weight < 0 or self.kl_anneal_steps < 0:
            raise UsageError("--kl-weight, --contrast-weight and --kl-anneal-steps must be >= 0")
        if self.routing_reg is not None and self.routing_reg < 0:
            raise UsageError("--routing-reg must be >= 0")
        if self.negatives_per not in ("batch", "sequence", "position"):
            raise UsageError(f"unknown --negatives-per {self.negatives_per!r}", hint="use batch, sequence or position")
        if self.negatives is None and self.in_batch_negatives:
            raise UsageError("--in-batch-negatives shapes a sampled softmax",
                             hint="add --negatives N, e.g. --negatives 256")
        if self.router and self.decoder != "heads":
            raise UsageError("--router routes between prior heads", hint="drop --router or use --decoder heads")
        if self.router and not self.priors:
            raise UsageError("--router needs heads to route between", hint="add --priors (e.g. --priors item)")
        if not (self.router_weight >= 0 and math.isfinite(self.router_weight)):
            raise UsageError("--router-weight must be a finite number >= 0")
        if self.beta and self.in_batch_negatives:
            raise UsageError("--beta reweights uniform negatives only", hint="drop --in-batch-negatives")
        if self.beta and self.negatives is None:
            raise UsageError("--beta reweights sampled negatives (REMI's hard negatives)",
                             hint="add --negatives N, e.g. --negatives 256")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["priors"] = list(self.priors)
        d["text_cols"] = list(self.text_cols)
        if self.backbone != "hllm":
            for k in HLLM_FIELDS:
                d.pop(k)
        elif not self.train_item_llm:
            d.pop("train_item_llm")  # the frozen default keeps the keys runs had before the flag
        for k, legacy in LEGACY_VALUES.items():
            if d[k] == legacy or (k in SAMPLED_ONLY and self.negatives is None):
                d.pop(k)
        if not self.router:
            d.pop("router_weight")
        if self.decoder == "heads":
            d.pop("decoder")
        for k, users in DECODER_FIELDS.items():
            if self.decoder not in users and not (k == "beta" and self.beta):
                d.pop(k)
        return d

    def decoder_options(self) -> DecoderOptions:
        return DecoderOptions(self.decoder, self.interests, self.routing_reg, self.kl_weight,
                              self.kl_anneal_steps, self.contrast_weight)


@dataclass
class TrainResult:
    name: str
    path: Path
    key: str
    cached: bool
    best: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory and the store."""

    name: str
    path: Path
    config: dict[str, Any]
    model: MultiHeadRecommender
    layout: HeadLayout
    compat: Compatibility
    windows: WindowsRef
    priors: tuple[PriorSpec, ...]


# ---------------------------------------------------------------------------------------------
# pieces


def default_run_name(p: TrainParams) -> str:
    priors = "_".join(n.replace(":", "") for n in p.priors) if p.priors else "base"
    if p.decoder != "heads":
        priors = f"{p.decoder}{p.interests}"
    comp = f"-{p.compose[:4]}" if len(p.priors) > 1 else ""
    glob = "-g" if p.global_head else ""
    ft = "-ft" if p.train_item_llm else ""
    return f"{p.backbone}{p.size}{ft}-{priors}{comp}{glob}-s{p.seed}"


def _load_priors(dataset: Dataset, names: tuple[str, ...], n_items: int, seed: int) -> tuple[PriorSpec, ...]:
    """The named priors: built ones from the store; `random:K` / `all:K` made here (their
    assignment drawn from the run's seed)."""
    con = connect(dataset.store_path, read_only=True)
    try:
        return tuple(synthetic_prior(n, n_items, seed) if is_synthetic(n) else load_prior(con, n) for n in names)
    finally:
        con.close()


def make_layout(p: TrainParams, specs: tuple[PriorSpec, ...], n_items: int) -> HeadLayout:
    """The heads of a run: the priors' layout, or K interests for a baseline decoder."""
    if p.decoder != "heads":
        return interest_layout(p.interests, n_items)
    return build_layout(specs, p.compose, p.global_head)


def _check_horizon(specs: tuple[PriorSpec, ...], windows: WindowsRef) -> None:
    tau = windows.params["horizon"]
    hold = int(windows.params.get("holdout", tau))  # held-out targets per split (H ≥ τ)
    for spec in specs:
        if spec.kind == "temporal" and len(spec.horizon_groups) != tau:
            raise UsageError(
                f"temporal prior {spec.name!r} covers a horizon of {len(spec.horizon_groups)}, "
                f"the windows have τ = {tau}",
                hint=f"rebuild it with `mhr priors build --kind temporal --horizon {tau} --name {spec.name}`",
            )
        holdout = spec.params.get("holdout")
        if holdout is not None and int(holdout) < 2 * hold and windows.params.get("protocol") != "loo":
            raise UsageError(
                f"prior {spec.name!r} was built holding out the last {holdout} interactions per user, "
                f"but validation + test targets are the last {2 * hold}: the prior would leak them",
                hint=f"rebuild it with --holdout {2 * hold}",
            )


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _logit_bytes(p: TrainParams, batch: int, seq_len: int, horizon: int) -> int:
    """What sampled negatives add, taking the B·L·τ (position, target) pairs as the positives.

    The shared per-batch draw (the legacy sampler) scores every positive against n negatives at
    once: [B·L·τ, n] fp32 logits held about three times (scores, masked copy, gradient). The other
    modes chunk their logits (`mhr.sampling.CHUNK_ELEMENTS`) but keep the drawn ids, int64 [rows, n]
    with rows = 1, B or B·L·τ per batch / sequence / position (+ fp32 offsets with --logq). The full
    softmax is chunked inside the loss, so it adds nothing here."""
    if p.negatives is None:
        return 0
    positives = batch * seq_len * horizon
    if p.negatives_per == "batch" and not p.in_batch_negatives and not p.logq:
        return 3 * 4 * positives * p.negatives
    from mhr.sampling import CHUNK_ELEMENTS

    rows = {"batch": 1, "sequence": batch}.get(p.negatives_per, positives)
    return rows * p.negatives * (12 if p.logq else 8) + 3 * 4 * CHUNK_ELEMENTS


def _check_negatives(p: TrainParams, n_items: int) -> None:
    """More negatives than items only repeats items (draws are with replacement) at the cost of
    memory; the catalogue is the bound, not a head's group, whose size varies by head."""
    if p.negatives is not None and p.negatives > n_items:
        raise UsageError(f"--negatives {p.negatives} is more than the catalogue's {n_items} items",
                         hint=f"use at most {n_items}, or --negatives full for every item")


def _check_memory(p: TrainParams, config: Any, seq_len: int, device: str, horizon: int = 1) -> None:
    model = BACKBONES[p.backbone].estimate_memory(config, p.batch_size, seq_len)
    logits = _logit_bytes(p, p.batch_size, seq_len, horizon)
    need = model + logits
    have = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else _available_memory()
    if need > 0.9 * have:
        negs = f" and {p.negatives} negatives ({logits / 2**30:.1f} GiB of logits)" if logits else ""
        raise TrainingError(
            f"--size {p.size} at batch {p.batch_size}{negs} needs about {need / 2**30:.1f} GiB, "
            f"{have / 2**30:.1f} GiB is available on {device}",
            hint="lower --batch-size or --negatives, pick a smaller --size or use a GPU (--device cuda)",
        )


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return f


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The batch order of one epoch: a function of (seed, epoch) only, so resume can recompute it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _batch(train: dict[str, np.ndarray], rows: np.ndarray, context: int, horizon: int, device) -> dict:
    items = train["items"][rows]
    events = train["events"][rows]
    tgt = horizon_targets(items, horizon)[:, :context]
    tgt_ev = horizon_targets(events.astype(np.int64), horizon)[:, :context]
    # a target beyond the window's real length is padding (item 0) in `tgt`; its event is 0 too
    tgt_ev = np.where(tgt > 0, tgt_ev, 0)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return {
        "items": to(items[:, :context]),
        "ts": to(train["ts"][rows][:, :context]),
        "targets": to(tgt),
        "target_events": to(tgt_ev),
        "users": to(train["user"][rows].astype(np.int64)),
    }


def _validate(model, compat, valid, k: int, device) -> float:
    compat = copy.copy(compat)  # training keeps its own sets: resume must see the same state
    refresh_eligibility(model, compat)
    ranking = rank_split(model, compat, valid, k=k, fusion="max", device=device)
    return float(np.mean(ndcg_at_k(ranking.items, valid["targets"], k)))


# ---------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, never pickles; each file's sha256 recorded when written and
# checked before use, so damaged weights fail loudly instead of scoring everything 0


def _verify_file(path: Path, digest: str, size: int | None, hint: str) -> None:
    if not path.is_file():
        raise InputError(f"{path} is missing", hint=hint)
    if (size is not None and path.stat().st_size != size) or file_sha256(path) != digest:
        raise InputError(f"{path} is damaged: its sha256 differs from the one recorded when it was written",
                         hint=hint)


def _read_tensors(path: Path, hint: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error for a bad header, OSError, …: all mean damaged
        raise InputError(f"{path} is damaged or truncated ({type(e).__name__}: {e})", hint=hint) from None


def _save_checkpoint(path: Path, model, optimizer, scheduler, gen: torch.Generator, state: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # the pid tells `mhr gc` whose it is
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = {}, {"param_groups": optimizer.state_dict()["param_groups"], "state": {}}
    for pid, st in optimizer.state_dict()["state"].items():
        meta = {}
        for name, value in st.items():
            if torch.is_tensor(value):
                opt_tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta[name] = value
        opt_meta["state"][str(pid)] = meta
    opt_tensors["__rng_torch"] = torch.get_rng_state()
    opt_tensors["__rng_gen"] = gen.get_state()
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    full = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "sha256": {f: file_sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")}}
    (tmp / "state.json").write_text(json.dumps(full, indent=1, default=float))
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _recover_checkpoint(path: Path) -> None:
    """A trainer killed between `_save_checkpoint`'s two renames left its previous checkpoint as
    `checkpoint.old-PID` and none in place: put that one back (the newest, if several)."""
    olds = sorted(path.parent.glob(f"{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and (olds[-1] / "state.json").is_file():
        os.replace(olds[-1], path)


def _load_checkpoint(path: Path, model, optimizer, scheduler, gen: torch.Generator) -> dict:
    hint = "start the run over with --force"
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"checkpoint {path / 'state.json'} is damaged ({e})", hint=hint) from None
    for file, digest in state.get("sha256", {}).items():  # checkpoints written before hashes: none
        _verify_file(path / file, digest, None, hint)
    weights = _read_tensors(path / "model.safetensors", hint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint {path} does not fit this model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})",
            hint="resume with the run's own config, or train anew with --force",
        )
    tensors = _read_tensors(path / "optimizer.safetensors", hint)
    opt_state: dict[int, dict] = {}
    for pid, meta in state["optimizer"]["state"].items():
        opt_state[int(pid)] = dict(meta)
    for name, value in tensors.items():
        if name.startswith("__"):
            continue
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["__rng_torch"])
    gen.set_state(tensors["__rng_gen"])
    return state


# ---------------------------------------------------------------------------------------------
# the stage


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def check_device(device: str) -> str:
    """`device` if this machine and PyTorch build can use it, else a UsageError saying why."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {device!r}", hint="use cpu, cuda, cuda:N or mps") from None
    hint = "use --device cpu (or install a PyTorch build for this accelerator)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this PyTorch build sees no CUDA GPU", hint=hint)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs", hint=hint)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here", hint=hint)
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device} is not supported", hint="use cpu, cuda, cuda:N or mps")
    return device


def run_lock_path(dataset: Dataset, name: str) -> Path:
    return lock_path(dataset.runs_dir / name)


@contextmanager
def _deterministic(on: bool, device: str) -> Iterator[None]:
    """One intra-op thread and torch's deterministic algorithms for the block (then as before).

    On CPU, with several threads the backward of indexing by a tensor (`item_vecs[ids]`: an
    accumulating index_put) adds in a varying order, so identical runs drift apart in the last bits
    within a few steps; deterministic algorithms remove that, one thread also makes the result
    independent of the machine's core count. On a GPU it is best effort: ops without a
    deterministic kernel only warn.
    """
    if not on:
        yield
        return
    threads, algorithms = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' reproducible workspaces
    torch.use_deterministic_algorithms(True, warn_only=not device.startswith("cpu"))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms)


def _recorded(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def train(
    dataset: Dataset,
    params: TrainParams,
    windows: str | None = None,
    name: str | None = None,
    device: str = "cpu",
    force: bool = False,
    resume: bool = False,
    checkpoint_every: int = 0,
    show_progress: bool = True,
    deterministic: bool = False,
) -> TrainResult:
    """Train (or skip, or resume) one run; returns where it is and its best validation figures.

    The run's write lock is held throughout: a second trainer of the same run (or a second
    `--resume`) gets BusyError naming the first one's pid. `deterministic` trains on one CPU thread
    with torch's deterministic algorithms, so identical runs give identical weights at any machine
    load; it is recorded in config.json but is not part of the run key.
    """
    params.check()
    check_device(device)
    name = check_name(name or default_run_name(params), "run")
    if resume and not deterministic:  # a resumed run keeps the mode it was started in
        deterministic = _recorded(dataset.runs_dir / name).get("deterministic") is True
    holder = f"mhr train (pid {os.getpid()})"
    lock = locked(run_lock_path(dataset, name), holder, f"run {name}") if _dist_info()[1] == 0 else _nullcontext()
    with lock, _deterministic(deterministic, device):
        return _train(dataset, params, windows, name, device, force, resume, checkpoint_every, show_progress,
                      deterministic)


def _train(
    dataset: Dataset,
    params: TrainParams,
    windows: str | None,
    name: str,
    device: str,
    force: bool,
    resume: bool,
    checkpoint_every: int,
    show_progress: bool,
    deterministic: bool,
) -> TrainResult:
    params.check()
    name = check_name(name or default_run_name(params), "run")
    run_dir = dataset.runs_dir / name
    wref = load_windows(dataset, windows)
    backbone_inputs, overrides, n_items = {}, {}, int(wref.stats["max_item_id"])
    inputs: dict[str, str] = {"windows": wref.key}
    if params.backbone == "hllm" and params.train_item_llm:
        from mhr.models.item_text import item_texts, model_identity

        if params.negatives is None:
            raise UsageError(
                "--train-item-llm needs sampled negatives: a full softmax would re-encode every item each step",
                hint="add --negatives N, e.g. --negatives 256",
            )
        con = connect(dataset.store_path, read_only=True)
        try:
            texts = item_texts(con, params.text_cols)
        finally:
            con.close()
        identity = model_identity(params.item_llm)
        inputs["item_llm"] = stage_key("item_llm", identity, {})
        backbone_inputs["item_texts"] = texts
        overrides = dict(user_llm=params.user_llm, item_dim=identity["dim"], item_llm=params.item_llm,
                         pooling=params.pooling, train_item_llm=True, max_text_len=params.max_text_len)
        n_items = len(texts)  # the whole catalogue: cold items keep their text vectors
    elif params.backbone == "hllm":
        from mhr.models.item_text import embed_items, load_item_embeddings

        emb_key, _ = embed_items(dataset, params.item_llm, params.text_cols, params.max_text_len,
                                 params.pooling, device=device, show_progress=show_progress)
        table = load_item_embeddings(dataset, emb_key)
        inputs["item_embeddings"] = emb_key
        backbone_inputs["item_embeddings"] = table
        overrides = dict(user_llm=params.user_llm, item_dim=table.shape[1], item_llm=params.item_llm,
                         pooling=params.pooling, item_embeddings_key=emb_key, max_text_len=params.max_text_len)
        n_items = table.shape[0] - 1  # the whole catalogue: cold items keep their text vectors
    specs = _load_priors(dataset, params.priors, n_items, params.seed)
    _check_horizon(specs, wref)
    inputs.update({f"prior:{s.name}": s.key for s in specs})
    key = stage_key("train", params.as_dict(), inputs)

    if not force and is_done(run_dir, key):
        manifest = json.loads((run_dir / "manifest.json").read_text())
        return TrainResult(name, run_dir, key, True, manifest.get("best", {}))
    config_path = run_dir / "config.json"
    if run_dir.exists() and not force:
        old = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if old.get("key") != key:
            raise UsageError(
                f"run {name!r} exists with other parameters or inputs",
                hint="pass --force to retrain it, or --name for a new run",
            )
        if not resume:
            raise UsageError(
                f"run {name!r} is incomplete (interrupted?)",
                hint=f"continue it with `mhr train --resume {name}` or start over with --force",
            )
    if force and run_dir.exists():
        shutil.rmtree(run_dir)

    world, rank = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if params.batch_size % world:
        raise UsageError(f"--batch-size {params.batch_size} is not divisible by {world} processes")

    T, tau = int(wref.params["context"]), int(wref.params["horizon"])
    config = backbone_config(params.backbone, params.size, n_items, T, dropout=params.dropout, **overrides)
    _check_negatives(params, n_items)
    _check_memory(params, config, T, device, tau)
    layout = make_layout(params, specs, n_items)

    torch.manual_seed(params.seed)
    model = build_model(params.backbone, config, layout, params.score, params.temperature,
                        params.decoder_options(), router=params.router, **backbone_inputs).to(device)
    compat = Compatibility(layout, n_items, wref.event_vocab).to(device)
    gen = torch.Generator(device=device).manual_seed(params.seed + 1)

    train_split = wref.read_split("train")
    valid = wref.read_split("valid")
    n_windows = len(train_split["user"])
    steps_per_epoch = math.ceil(n_windows / params.batch_size)
    total = params.max_steps or steps_per_epoch * params.epochs
    eval_every = params.eval_every or steps_per_epoch

    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(params.warmup_steps, total))
    train_omega = compat.omega
    if params.backbone == "hllm":
        # items never seen in training are left out of the negatives, so cold items keep the
        # text-derived vectors they are recommended by instead of being pushed down
        seen = torch.zeros(n_items + 1, dtype=torch.bool)
        seen[torch.from_numpy(np.unique(train_split["items"]))] = True
        train_omega = compat.omega & seen.to(device)
    step_module = _LossStep(model, compat, params, gen, train_omega)
    ddp_model = torch.nn.parallel.DistributedDataParallel(step_module) if world > 1 else step_module

    record = {
        "format": RUN_FORMAT,
        "key": key,
        "name": name,
        "params": params.as_dict(),
        "inputs": inputs,
        "backbone_config": dataclasses.asdict(config),
        "layout": {"names": list(layout.names), "compose": layout.compose, "global_head": layout.global_head},
        "windows": {"key": wref.key, "params": wref.params},
        "dataset": dataset.name,
        "data_key": wref.data_key,
        "device": device,
        "world_size": world,
        "deterministic": deterministic,
        "threads": torch.get_num_threads(),
    }
    state = {"step": 0, "best_ndcg": -1.0, "best_step": -1, "bad_evals": 0, "stopped": False}
    ckpt = run_dir / "checkpoint"
    if resume and not ckpt.is_dir():
        _recover_checkpoint(ckpt)
    if resume and ckpt.is_dir():
        state = _load_checkpoint(ckpt, model, optimizer, scheduler, gen)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(record, indent=2, sort_keys=True))
        (run_dir / "log.jsonl").write_text("")
    if rank == 0:
        _trim_log(run_dir / "log.jsonl", state["step"])

    n_params = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in model.heads.parameters())
    if show_progress and rank == 0:
        err.print(
            f"[bold]{name}[/]: {params.backbone} size {params.size} ({n_params:,} parameters; "
            f"{layout.n_heads} heads, {head_params:,} head parameters = {100 * head_params / n_params:.2f}%), "
            f"{n_windows:,} windows, {steps_per_epoch} steps/epoch, up to {total} steps"
        )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _nullcontext()
    )
    model.train()
    step = int(state["step"])
    t0, seqs = time.time(), 0
    bar = progress() if show_progress and rank == 0 else None
    if bar:
        bar.start()
        task = bar.add_task(name, total=total, completed=step, info="")
    try:
        while step < total and not state["stopped"]:
            epoch, offset = divmod(step, steps_per_epoch)
            order = _epoch_order(params.seed, epoch, n_windows)
            rows = order[offset * params.batch_size : (offset + 1) * params.batch_size]
            rows = rows[rank::world]
            b = _batch(train_split, rows, T, tau, device)
            with autocast:
                loss, stats = ddp_model(b["items"], b["ts"], b["targets"], b["target_events"], b["users"])
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {step} of run {name}",
                    hint="lower --lr or raise --temperature; the last good checkpoint is kept in "
                    f"{ckpt} (resume with --resume {name})",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if params.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seqs += len(rows) * world
            logged = loss.detach()
            if world > 1:  # log the global batch's loss, not this process's half
                torch.distributed.all_reduce(logged)
                logged = logged / world
            entry: dict[str, Any] = {"step": step, "epoch": epoch, "loss": round(float(logged.item()), 6),
                                     "lr": scheduler.get_last_lr()[0]}
            if step % eval_every == 0 or step == total:
                ndcg = _validate(model, compat, valid, 10, device)
                entry["valid_ndcg@10"] = ndcg
                if ndcg > state["best_ndcg"]:
                    state.update(best_ndcg=ndcg, best_step=step, bad_evals=0)
                    if rank == 0:
                        _save_weights(model, run_dir / "model.safetensors")
                else:
                    state["bad_evals"] += 1
                    if params.patience and state["bad_evals"] >= params.patience:
                        state["stopped"] = True
                model.train()
            if rank == 0:
                elapsed = max(time.time() - t0, 1e-9)
                entry["seq_per_s"] = round(seqs / elapsed, 1)
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")
                if bar:
                    info = f"loss {entry['loss']:.4f} · {entry['seq_per_s']:.0f} seq/s"
                    if state["best_ndcg"] >= 0:
                        info += f" · best NDCG@10 {state['best_ndcg']:.4f}"
                    bar.update(task, completed=step, info=info)
            state["step"] = step
            if rank == 0 and (
                (checkpoint_every and step % checkpoint_every == 0) or step % eval_every == 0
            ):
                _save_checkpoint(ckpt, model, optimizer, scheduler, gen, state)
    finally:
        if bar:
            bar.stop()
    state["step"] = step
    best = {"valid_ndcg@10": state["best_ndcg"], "step": state["best_step"], "steps": step,
            "early_stopped": bool(state["stopped"])}
    if rank == 0:
        _save_checkpoint(ckpt, model, optimizer, scheduler, gen, state)
        if not (run_dir / "model.safetensors").exists():
            _save_weights(model, run_dir / "model.safetensors")
        write_manifest(run_dir, "train", key, params.as_dict(), inputs, best=best,
                       n_parameters=n_params, head_parameters=head_params)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(name, run_dir, key, False, best)


class _LossStep(torch.nn.Module):
    """Model + loss as one module, so DistributedDataParallel sees every parameter that the loss
    touches (the scorer's temperature and the scoring item table included) inside forward."""

    def __init__(self, model: MultiHeadRecommender, compat: Compatibility, params: TrainParams,
                 gen: torch.Generator, omega: torch.Tensor, selective: bool = True) -> None:
        super().__init__()
        self.model = model
        self.compat = compat
        self.params = params
        self.gen = gen
        self.omega = omega
        # the prior heads decode state by state, so only the queries the loss reads are computed;
        # `selective=False` keeps the dense reference (every head at every position)
        self.selective = selective and isinstance(model.heads, PriorHeads)

    def forward(self, items, ts, targets, target_events, users):
        p = self.params
        negs, step = None, _nullcontext()
        if getattr(self.model.backbone, "trains_item_llm", False):
            # a fine-tuned item LLM encodes only this step's items, once: the inputs, the targets and
            # the negatives, drawn first (from the same generator, so runs stay resumable)
            negs = sample_negatives(self.omega, p.negatives, p.negatives_from, p.global_ratio, self.gen)
            step = self.model.backbone.encoding(torch.unique(torch.cat([items.flatten(), targets.flatten(),
                                                                        negs.flatten()])))
        with step:
            scorer = self.model.scorer
            h = self.model.backbone(items, ts)
            if self.selective:  # prior heads: each query computed only where the loss reads it
                h = h.float()
                q, aux = SelectedQueries(self.model.heads, h, scorer.prepare_queries), {}
            else:
                q, aux = self.model.heads.decode(h, items != 0)
                q = q.float()
            item_vecs = self.model.item_vectors().float()
            omega = self.omega
            own = self.model.heads.eligibility(item_vecs)  # DualVAE: each item's own aspect
            if own is not None:
                omega = omega & own
            compat_t = self.compat.targets(targets, target_events, users)
            compat_t = self.model.heads.assign(q, item_vecs, scorer, targets, compat_t)
            # normalised once, then plain dot products inside the loss
            if self.selective:
                item_vecs = scorer.prepare_items(item_vecs)
            else:
                q, item_vecs = scorer.prepare(q, item_vecs)
            loss, stats = multihead_loss(
                q,
                item_vecs,
                dot_scores,
                targets,
                compat_t,
                omega,
                gamma=p.gamma,
                head_weights=p.head_weights,
                negatives=p.negatives,
                negatives_from=p.negatives_from,
                global_ratio=p.global_ratio,
                generator=self.gen,
                hard_negative_beta=p.beta,
                negative_ids=negs,
                negatives_per=p.negatives_per,
                in_batch=p.in_batch_negatives,
                logq=p.logq,
            )
        if self.model.router is not None:  # p(k | h), trained jointly with the heads
            route = router_loss(self.model.router(h.float()), targets, compat_t, p.gamma)
            loss = loss + p.router_weight * route
            stats["router"] = route.detach()
        if self.selective:  # heads without a positive in this batch still count as used (DDP)
            loss = loss + q.anchor()
        for term, value in aux.items():  # the decoder's regularisers (REMI's routing, DualVAE's KL)
            loss = loss + value.float()
            stats[term] = value.detach()
        return loss, stats


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _save_weights(model, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def resume_params(dataset: Dataset, name: str) -> tuple[TrainParams, str]:
    """The parameters and windows key an interrupted run was started with."""
    path = dataset.runs_dir / check_name(name, "run") / "config.json"
    if not path.is_file():
        raise NotFoundError(f"no run {name!r} in {dataset.runs_dir}", hint="see `mhr status` for runs")
    record = json.loads(path.read_text())
    return _params_from_record(record), record["windows"]["key"]


def _params_from_record(record: dict[str, Any]) -> TrainParams:
    p = {**LEGACY_VALUES, **record["params"]}
    p["priors"] = tuple(p["priors"])
    if "text_cols" in p:
        p["text_cols"] = tuple(p["text_cols"])
    return TrainParams(**p)


def _verify_run(run_dir: Path, hint: str) -> None:
    """The run's config and weights against the sizes and sha256 its manifest recorded (a file the
    manifest does not list is taken as it is: nothing to check it against)."""
    try:
        files = json.loads((run_dir / "manifest.json").read_text())["files"]
        json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"run {run_dir.name!r} in {run_dir} is damaged ({type(e).__name__}: {e})",
                         hint=hint) from None
    for file in ("config.json", "model.safetensors"):
        if file in files:
            _verify_file(run_dir / file, files[file]["sha256"], files[file]["size"], hint)


def load_run(dataset: Dataset, name: str, device: str = "cpu") -> LoadedRun:
    """Rebuild a finished run; refuses when the store's priors or data changed since training."""
    run_dir = dataset.runs_dir / check_name(name, "run")
    if not (run_dir / "manifest.json").is_file():
        raise NotFoundError(
            f"run {name!r} is not finished in {dataset.runs_dir}",
            hint="train it with `mhr train` (or finish it with `mhr train --resume NAME`)",
        )
    check_device(device)
    hint = f"retrain it with `mhr train … --name {name} --force`"
    _verify_run(run_dir, hint)
    record = json.loads((run_dir / "config.json").read_text())
    con = connect(dataset.store_path, read_only=True)
    try:
        current = data_key(con)
        if current != record["data_key"]:
            raise StaleError(
                f"run {name!r} was trained on another version of dataset {dataset.name} "
                f"(data key {record['data_key'][:12]} ≠ {current[:12]})",
                hint="retrain the run on the current data",
            )
        params = _params_from_record(record)
        n_items = int(record["backbone_config"]["n_items"])
        specs = tuple(synthetic_prior(n, n_items, params.seed) if is_synthetic(n) else load_prior(con, n)
                      for n in params.priors)
    finally:
        con.close()
    for spec in specs:
        if record["inputs"].get(f"prior:{spec.name}") != spec.key:
            raise StaleError(
                f"prior {spec.name!r} was rebuilt since run {name!r} was trained (keys differ)",
                hint="retrain the run, or rebuild the prior with its old parameters",
            )
    wref = load_windows(dataset, record["windows"]["key"])
    layout = make_layout(params, specs, n_items)
    family = BACKBONES[params.backbone]
    config = family.config_cls(**record["backbone_config"])
    model = build_model(params.backbone, config, layout, params.score, params.temperature, params.decoder_options(),
                        router=params.router)
    try:
        model.load_state_dict(_read_tensors(run_dir / "model.safetensors", hint))
    except RuntimeError as e:  # names or shapes that do not fit the config
        raise InputError(f"{run_dir / 'model.safetensors'} does not fit {run_dir / 'config.json'} ({e})",
                         hint=hint) from None
    model.to(device).eval()
    compat = Compatibility(layout, config.n_items, wref.event_vocab).to(device)
    refresh_eligibility(model, compat)
    return LoadedRun(name, run_dir, record, model, layout, compat, wref, specs)
