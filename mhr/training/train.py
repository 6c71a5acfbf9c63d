"""One training loop for every backbone and head layout (docs/ARCHITECTURE.md, "Runs").

`train()` is the stage: windows + priors + parameters → `runs/<name>/` holding `config.json`
(everything needed to rebuild the model), `model.safetensors` (the best weights on validation
NDCG@10), `log.jsonl`, `checkpoint/` (weights, optimizer, scheduler and RNG state, no pickles) and
`manifest.json` written last. A run with the same key is skipped; `resume=True` continues from the
last checkpoint and ends bit-identical to an uninterrupted run on CPU, because every source of
randomness (batch order, dropout, negative sampling) is either derived from (seed, epoch) or
restored from the checkpoint.

`train()` runs in phases, one function each: `_resolve_inputs` (windows, priors, item texts → the
run key), `_prepare_run_dir` (cached, conflicting, resumable or new), `_setup_distributed`,
`_build` (model, optimizer, loss and this process's data), `_start` (a fresh run folder or the
last checkpoint), `_loop` (`_step` and `_validate_and_stop` per step) and `_finish`.

Distributed: under `torchrun` (WORLD_SIZE > 1) each process reads only its shard of the training
windows — a contiguous 1/N slice, so per-process memory falls with N. The global batches are those
of a single process: each process fills in the batch's windows it holds and a sum over processes
(one all-reduce of B × (3(T+τ)+1) integers per step) completes the batch, of which each process
trains on every N-th row. DistributedDataParallel averages gradients; only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhr.cache import dumps_json, is_done, locked, stage_key, write_manifest
from mhr.console import err, progress
from mhr.errors import TrainingError, UsageError
from mhr.models.heads import Compatibility, HeadLayout
from mhr.models.multihead import (
    BACKBONES,
    MultiHeadRecommender,
    backbone_config,
    build_model,
    refresh_eligibility,
)
from mhr.priors.kinds import HORIZON
from mhr.priors.spec import PriorSpec
from mhr.ranking.inference import rank_split
from mhr.ranking.metrics import ndcg_at_k
from mhr.store import connect
from mhr.training import checkpoint
from mhr.training.optim import build_optimizer, clip_grad_norm
from mhr.training.params import TrainParams, default_run_name
from mhr.training.runs import check_device, load_priors, make_layout, read_record, run_lock_path, run_record
from mhr.training.step import LossStep, batch_rows, make_batch
from mhr.windows import WindowsRef, load_windows, sample_rows, subset_split
from mhr.workspace import Dataset, check_name

__all__ = ["TrainResult", "held_rows", "shard_bounds", "train", "unpack_rows"]


@dataclass
class TrainResult:
    name: str
    path: Path
    key: str
    cached: bool
    best: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# pieces


def _check_horizon(specs: tuple[PriorSpec, ...], windows: WindowsRef) -> None:
    tau = windows.params["horizon"]
    hold = int(windows.params.get("holdout", tau))  # held-out targets per split (H ≥ τ)
    for spec in specs:
        if spec.maps == HORIZON and len(spec.horizon_groups) != tau:
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
    modes chunk their logits (`mhr.training.sampling.CHUNK_ELEMENTS`) but keep the drawn ids, int64 [rows, n]
    with rows = 1, B or B·L·τ per batch / sequence / position (+ fp32 offsets with --logq). The full
    softmax is chunked inside the loss, so it adds nothing here."""
    if p.negatives is None:
        return 0
    positives = batch * seq_len * horizon
    if p.negatives_per == "batch" and not p.in_batch_negatives and not p.logq:
        return 3 * 4 * positives * p.negatives
    from mhr.training.sampling import CHUNK_ELEMENTS

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


def shard_bounds(n_windows: int, rank: int, world: int) -> tuple[int, int]:
    """Windows [lo, hi) that process `rank` of `world` holds: a contiguous slice, the sizes
    differing by at most one."""
    return rank * n_windows // world, (rank + 1) * n_windows // world


def held_rows(shard: dict[str, np.ndarray], lo: int, rows: np.ndarray) -> np.ndarray:
    """The global batch's windows this process holds (its shard starts at window `lo`), packed as
    int64 [len(rows), 3·W + 1] (items, ts, events, user), zeros for rows other processes hold: summed
    over the processes they give the whole batch."""
    n, width = shard["items"].shape
    held = (rows >= lo) & (rows < lo + n)
    local = rows[held] - lo
    packed = np.zeros((len(rows), 3 * width + 1), np.int64)
    packed[held, :width] = shard["items"][local]
    packed[held, width : 2 * width] = shard["ts"][local]
    packed[held, 2 * width : 3 * width] = shard["events"][local]
    packed[held, -1] = shard["user"][local]
    return packed


def unpack_rows(packed: np.ndarray) -> dict[str, np.ndarray]:
    """`held_rows`' packing back to the arrays of `WindowsRef.read_split("train")`."""
    width = (packed.shape[1] - 1) // 3
    return {"items": packed[:, :width], "ts": packed[:, width : 2 * width],
            "events": packed[:, 2 * width : 3 * width].astype(np.int16), "user": packed[:, -1]}


def _gather_batch(shard: dict[str, np.ndarray], lo: int, rows: np.ndarray, device: str) -> dict[str, np.ndarray]:
    """Under torchrun: the whole global batch, each process contributing the windows it holds."""
    packed = torch.from_numpy(held_rows(shard, lo, rows)).to(device)
    torch.distributed.all_reduce(packed)
    return unpack_rows(packed.cpu().numpy())


def _valid_split(wref: WindowsRef, params: TrainParams) -> dict[str, np.ndarray]:
    """The users validation scores: all of the valid split, or a seeded sample of `valid_users`."""
    valid = wref.read_split("valid")
    n = len(valid["user"])
    if params.valid_users is None or params.valid_users >= n:
        return valid
    return subset_split(valid, sample_rows(n, params.valid_users))


def _validate(model, compat, valid, k: int, device) -> float:
    compat = copy.copy(compat)  # training keeps its own sets: resume must see the same state
    refresh_eligibility(model, compat)
    ranking = rank_split(model, compat, valid, k=k, fusion="max", device=device)
    return float(np.mean(ndcg_at_k(ranking.items, valid["targets"], k)))


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


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


# ---------------------------------------------------------------------------------------------
# the stage, phase by phase


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
    if checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {checkpoint_every} must be >= 0", hint="0 checkpoints at each validation only")
    name = check_name(name or default_run_name(params), "run")
    run_dir = dataset.runs_dir / name
    if resume and not deterministic:  # a resumed run keeps the mode it was started in
        deterministic = read_record(run_dir).get("deterministic") is True
    holder = f"mhr train (pid {os.getpid()})"
    lock = locked(run_lock_path(dataset, name), holder, f"run {name}") if _dist_info()[1] == 0 else nullcontext()
    with lock, _deterministic(deterministic, device):
        inputs = _resolve_inputs(dataset, params, windows, device, show_progress)
        cached = _prepare_run_dir(run_dir, inputs.key, force, resume)
        if cached is not None:
            return cached
        dist = _setup_distributed(device, params.batch_size)
        run = _build(dataset, params, inputs, dist, name, run_dir)
        state = _start(run, resume, deterministic)
        _announce(run, show_progress)
        step = _loop(run, state, checkpoint_every, show_progress)
        return _finish(run, state, step)


@dataclass
class _Inputs:
    """What a run is trained from, and so its key."""

    windows: WindowsRef
    specs: tuple[PriorSpec, ...]
    n_items: int
    keys: dict[str, str]  # input -> its key: the windows, each prior, HLLM's item encoder
    key: str  # the run key
    config_overrides: dict[str, Any] = field(default_factory=dict)  # backbone settings beyond the size's
    backbone_inputs: dict[str, Any] = field(default_factory=dict)  # tensors the backbone is built from


def _resolve_inputs(dataset: Dataset, params: TrainParams, windows: str | None, device: str,
                    show_progress: bool) -> _Inputs:
    """Phase 1: the windows, the priors and (a backbone reading item texts) the texts or their embeddings
    → the run key."""
    wref = load_windows(dataset, windows)
    inp = _Inputs(wref, (), int(wref.stats["max_item_id"]), {"windows": wref.key}, "")
    if BACKBONES[params.backbone].reads_item_texts:
        _item_text_inputs(dataset, params, device, show_progress, inp)
    inp.specs = load_priors(dataset, params.priors, inp.n_items, params.seed)
    _check_horizon(inp.specs, wref)
    inp.keys.update({f"prior:{s.name}": s.key for s in inp.specs})
    inp.key = stage_key("train", params.as_dict(), inp.keys)
    return inp


def _item_text_inputs(dataset: Dataset, params: TrainParams, device: str, show_progress: bool,
                      inp: _Inputs) -> None:
    """HLLM reads the item texts (a fine-tuned item LLM) or their cached embeddings (a frozen one);
    either way it covers the whole catalogue, so cold items keep their text vectors."""
    common = dict(user_llm=params.user_llm, item_llm=params.item_llm, pooling=params.pooling,
                  max_text_len=params.max_text_len)
    if params.train_item_llm:
        from mhr.item_texts import item_texts
        from mhr.models.item_encoder import model_identity

        con = connect(dataset.store_path, read_only=True)
        try:
            texts = item_texts(con, params.text_cols)
        finally:
            con.close()
        identity = model_identity(params.item_llm)
        inp.keys["item_llm"] = stage_key("item_llm", identity, {})
        inp.backbone_inputs["item_texts"] = texts
        inp.config_overrides = dict(common, item_dim=identity["dim"], train_item_llm=True)
        inp.n_items = len(texts)
        return
    from mhr.item_texts import embed_items, load_item_embeddings

    emb_key, _ = embed_items(dataset, params.item_llm, params.text_cols, params.max_text_len,
                             params.pooling, device=device, show_progress=show_progress)
    table = load_item_embeddings(dataset, emb_key)
    inp.keys["item_embeddings"] = emb_key
    inp.backbone_inputs["item_embeddings"] = table
    inp.config_overrides = dict(common, item_dim=table.shape[1], item_embeddings_key=emb_key)
    inp.n_items = table.shape[0] - 1


def _prepare_run_dir(run_dir: Path, key: str, force: bool, resume: bool) -> TrainResult | None:
    """Phase 2: the finished run if its key matches (cached); otherwise refuse a folder holding
    another run or an interrupted one not being resumed, and clear it under `force`."""
    if not force and is_done(run_dir, key):
        manifest = json.loads((run_dir / "manifest.json").read_text())
        return TrainResult(run_dir.name, run_dir, key, True, manifest.get("best", {}))
    if run_dir.exists() and not force:
        if read_record(run_dir).get("key") != key:
            raise UsageError(
                f"run {run_dir.name!r} exists with other parameters or inputs",
                hint="pass --force to retrain it, or --name for a new run",
            )
        if not resume:
            raise UsageError(
                f"run {run_dir.name!r} is incomplete (interrupted?)",
                hint=f"continue it with `mhr train --resume {run_dir.name}` or start over with --force",
            )
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    return None


@dataclass(frozen=True)
class _Dist:
    world: int
    rank: int
    device: str  # this process's device (cuda:LOCAL_RANK under torchrun)


def _setup_distributed(device: str, batch_size: int) -> _Dist:
    """Phase 3: join the process group under torchrun (gloo on CPU, nccl on GPUs)."""
    world, rank = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size} is not divisible by {world} processes")
    return _Dist(world, rank, device)


@dataclass
class _Run:
    """Everything the loop works with; built once by `_build`."""

    name: str
    dir: Path
    params: TrainParams
    inputs: _Inputs
    dist: _Dist
    config: Any
    layout: HeadLayout
    model: MultiHeadRecommender
    compat: Compatibility
    gen: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_step: torch.nn.Module  # `LossStep`, wrapped in DistributedDataParallel under torchrun
    train: dict[str, np.ndarray]  # this process's shard of the training windows…
    shard_start: int  # … from window `shard_start` on
    valid: dict[str, np.ndarray]
    context: int  # T
    horizon: int  # τ
    n_windows: int  # every process's windows together
    steps_per_epoch: int
    total: int  # steps
    eval_every: int
    dataset: str


def _build(dataset: Dataset, params: TrainParams, inp: _Inputs, dist: _Dist, name: str, run_dir: Path) -> _Run:
    """Phase 4: model, compatibility sets, optimizer, schedule, loss and this process's data."""
    wref, n_items, device = inp.windows, inp.n_items, dist.device
    T, tau = int(wref.params["context"]), int(wref.params["horizon"])
    config = backbone_config(params.backbone, params.size, n_items, T, dropout=params.dropout,
                             **inp.config_overrides)
    _check_negatives(params, n_items)
    _check_memory(params, config, T, device, tau)
    layout = make_layout(params, inp.specs, n_items)

    torch.manual_seed(params.seed)
    model = build_model(params.backbone, config, layout, params.score, params.temperature,
                        params.decoder_options(), router=params.router, **inp.backbone_inputs).to(device)
    compat = Compatibility(layout, n_items, wref.event_vocab).to(device)
    gen = torch.Generator(device=device).manual_seed(params.seed + 1)

    n_windows = wref.count("train")
    if n_windows < dist.world:
        raise UsageError(f"{n_windows} training windows cannot be shared by {dist.world} processes",
                         hint="use fewer processes")
    shard = shard_bounds(n_windows, dist.rank, dist.world)
    train_split = wref.read_split("train", rows=shard)
    steps_per_epoch = math.ceil(n_windows / params.batch_size)
    total = params.max_steps or steps_per_epoch * params.epochs
    optimizer = build_optimizer(model, params.lr, params.weight_decay, params.sparse_embeddings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(params.warmup_steps, total))
    train_omega = compat.omega
    if BACKBONES[params.backbone].reads_item_texts:
        # items never seen in training are left out of the negatives, so cold items keep the
        # text-derived vectors they are recommended by instead of being pushed down (every
        # process's windows counted, so all draw from the same sets)
        seen = torch.zeros(n_items + 1, dtype=torch.bool)
        seen[torch.from_numpy(wref.seen_items("train"))] = True
        train_omega = compat.omega & seen.to(device)
    loss_step = LossStep(model, compat, params, gen, train_omega)
    if dist.world > 1:
        loss_step = torch.nn.parallel.DistributedDataParallel(loss_step)
    return _Run(name, run_dir, params, inp, dist, config, layout, model, compat, gen, optimizer, scheduler,
                loss_step, train_split, shard[0], _valid_split(wref, params), T, tau, n_windows, steps_per_epoch, total,
                params.eval_every or steps_per_epoch, dataset.name)


def _start(run: _Run, resume: bool, deterministic: bool) -> dict[str, Any]:
    """Phase 5: the training state — from the last checkpoint when resuming, else a fresh run
    folder holding config.json and an empty log (written by rank 0)."""
    state = {"step": 0, "best_ndcg": -1.0, "best_step": -1, "bad_evals": 0, "stopped": False}
    ckpt = run.dir / "checkpoint"
    if resume and not ckpt.is_dir():
        checkpoint.recover(ckpt)
    if resume and ckpt.is_dir():
        state = checkpoint.load(ckpt, run.model, run.optimizer, run.scheduler, run.gen)
    elif run.dist.rank == 0:
        run.dir.mkdir(parents=True, exist_ok=True)
        record = run_record(run.name, run.inputs.key, run.params, run.inputs.keys, run.config, run.layout,
                            run.inputs.windows, run.dataset, run.dist.device, run.dist.world, deterministic)
        (run.dir / "config.json").write_text(dumps_json(record, indent=2, sort_keys=True))
        (run.dir / "log.jsonl").write_text("")
    if run.dist.rank == 0:
        checkpoint.trim_log(run.dir / "log.jsonl", state["step"])
    return state


def _announce(run: _Run, show_progress: bool) -> None:
    if not (show_progress and run.dist.rank == 0):
        return
    p, n_params, head_params = run.params, _n_parameters(run.model), _n_parameters(run.model.heads)
    err.print(
        f"[bold]{run.name}[/]: {p.backbone} size {p.size} ({n_params:,} parameters; "
        f"{run.layout.n_heads} heads, {head_params:,} head parameters = {100 * head_params / n_params:.2f}%), "
        f"{run.n_windows:,} windows, {run.steps_per_epoch} steps/epoch, up to {run.total} steps"
    )


def _n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _loop(run: _Run, state: dict[str, Any], checkpoint_every: int, show_progress: bool) -> int:
    """Phase 6: steps until the budget is spent or validation stops the run; returns the step reached.
    Rank 0 logs every step and checkpoints at each validation (and every `checkpoint_every` steps)."""
    step, rank = int(state["step"]), run.dist.rank
    run.model.train()
    t0, seqs = time.time(), 0
    bar = progress() if show_progress and rank == 0 else None
    if bar:
        bar.start()
        task = bar.add_task(run.name, total=run.total, completed=step, info="")
    try:
        while step < run.total and not state["stopped"]:
            entry, rows = _step(run, step)
            step += 1
            seqs += rows * run.dist.world
            if step % run.eval_every == 0 or step == run.total:
                entry["valid_ndcg@10"] = _validate_and_stop(run, state, step)
            if rank == 0:
                entry["seq_per_s"] = round(seqs / max(time.time() - t0, 1e-9), 1)
                with open(run.dir / "log.jsonl", "a") as f:
                    f.write(dumps_json(entry) + "\n")
                if bar:
                    bar.update(task, completed=step, info=_progress_info(entry, state))
            state["step"] = step
            if rank == 0 and ((checkpoint_every and step % checkpoint_every == 0) or step % run.eval_every == 0):
                _save_checkpoint(run, state)
    finally:
        if bar:
            bar.stop()
    return step


def _step(run: _Run, step: int) -> tuple[dict[str, Any], int]:
    """One optimisation step on this process's rows of the global batch; returns the log entry
    (the global batch's loss) and how many rows this process trained on."""
    p, dist = run.params, run.dist
    rows, windows = batch_rows(p.seed, step, p.batch_size, run.n_windows), run.train
    if dist.world > 1:  # every N-th row of the global batch, whichever process holds it
        windows = _gather_batch(run.train, run.shard_start, rows, dist.device)
        rows = np.arange(len(rows))[dist.rank :: dist.world]
    b = make_batch(windows, rows, run.context, run.horizon, dist.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.startswith("cuda") else nullcontext()
    with autocast:
        loss, _ = run.loss_step(b["items"], b["ts"], b["targets"], b["target_events"], b["users"])
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss became {loss.item()} at step {step} of run {run.name}",
            hint="lower --lr or raise --temperature; the last good checkpoint is kept in "
            f"{run.dir / 'checkpoint'} (resume with --resume {run.name})",
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if p.clip > 0:
        clip_grad_norm(run.model.parameters(), p.clip)
    run.optimizer.step()
    run.scheduler.step()
    logged = loss.detach()
    if dist.world > 1:  # log the global batch's loss, not this process's share
        torch.distributed.all_reduce(logged)
        logged = logged / dist.world
    entry = {"step": step + 1, "epoch": step // run.steps_per_epoch, "loss": round(float(logged.item()), 6),
             "lr": run.scheduler.get_last_lr()[0]}
    return entry, len(rows)


def _validate_and_stop(run: _Run, state: dict[str, Any], step: int) -> float:
    """Phase 6b: validation NDCG@10; a new best is kept (rank 0 writes its weights), and `patience`
    validations without one stop the run."""
    ndcg = _validate(run.model, run.compat, run.valid, 10, run.dist.device)
    if ndcg > state["best_ndcg"]:
        state.update(best_ndcg=ndcg, best_step=step, bad_evals=0)
        if run.dist.rank == 0:
            checkpoint.save_weights(run.model, run.dir / "model.safetensors")
    else:
        state["bad_evals"] += 1
        if run.params.patience and state["bad_evals"] >= run.params.patience:
            state["stopped"] = True
    run.model.train()
    return ndcg


def _progress_info(entry: dict[str, Any], state: dict[str, Any]) -> str:
    info = f"loss {entry['loss']:.4f} · {entry['seq_per_s']:.0f} seq/s"
    if state["best_ndcg"] >= 0:
        info += f" · best NDCG@10 {state['best_ndcg']:.4f}"
    return info


def _save_checkpoint(run: _Run, state: dict[str, Any]) -> None:
    checkpoint.save(run.dir / "checkpoint", run.model, run.optimizer, run.scheduler, run.gen, state)


def _finish(run: _Run, state: dict[str, Any], step: int) -> TrainResult:
    """Phase 7: the last checkpoint, the weights (the last ones if validation never ran) and the
    manifest, written last by rank 0; every process waits for it."""
    state["step"] = step
    best = {"valid_ndcg@10": state["best_ndcg"], "step": state["best_step"], "steps": step,
            "early_stopped": bool(state["stopped"])}
    key, params = run.inputs.key, run.params
    if run.dist.rank == 0:
        _save_checkpoint(run, state)
        if not (run.dir / "model.safetensors").exists():
            checkpoint.save_weights(run.model, run.dir / "model.safetensors")
        write_manifest(run.dir, "train", key, params.as_dict(), run.inputs.keys, best=best,
                       n_parameters=_n_parameters(run.model), head_parameters=_n_parameters(run.model.heads))
    if run.dist.world > 1:
        torch.distributed.barrier()
    return TrainResult(run.name, run.dir, key, False, best)


