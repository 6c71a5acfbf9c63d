"""A run on disk, written and read in one place (docs/ARCHITECTURE.md, "Runs").

`runs/<name>/` holds `config.json` (`run_record`: everything needed to rebuild the model and how it
was trained), `model.safetensors`, `log.jsonl`, `checkpoint/` and `manifest.json`, written last by
the training loop (`mhr.training.train`). `load_run` rebuilds a finished run from the folder and the
store, after checking its files against the hashes the manifest recorded; `resume_params` reads back
what an interrupted one was started with. Evaluation, recommendation, the service and the report read
runs through this module, never through the training loop.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mhr.cache import lock_path
from mhr.errors import InputError, NotFoundError, StaleError, UsageError
from mhr.models.heads import Compatibility, HeadLayout, build_layout
from mhr.models.multihead import (
    BACKBONES,
    MultiHeadRecommender,
    build_model,
    interest_layout,
    refresh_eligibility,
)
from mhr.priors.spec import PriorSpec, load_prior
from mhr.priors.synthetic import is_synthetic, synthetic_prior
from mhr.store import connect, data_key
from mhr.training import checkpoint
from mhr.training.params import TrainParams
from mhr.windows import WindowsRef, load_windows
from mhr.workspace import Dataset, check_name

__all__ = ["RUN_FORMAT", "LoadedRun", "check_device", "load_priors", "load_run", "make_layout", "read_record",
           "resume_params", "run_lock_path", "run_record", "verify_run"]

RUN_FORMAT = 1


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


def load_priors(dataset: Dataset, names: tuple[str, ...], n_items: int, seed: int) -> tuple[PriorSpec, ...]:
    """The named priors: built ones from the store; `random:K` / `all:K` made here (their
    assignment drawn from the run's seed). Training and `load_run` both read them here."""
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


def read_record(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, or {} when it is missing or unreadable (an interrupted or foreign folder)."""
    try:
        record = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_record(name: str, key: str, params: TrainParams, inputs: dict[str, str], config: Any, layout: HeadLayout,
               windows: WindowsRef, dataset: str, device: str, world: int, deterministic: bool) -> dict[str, Any]:
    """config.json: everything `load_run` rebuilds the model from, and how it was trained."""
    return {
        "format": RUN_FORMAT,
        "key": key,
        "name": name,
        "params": params.as_dict(),
        "inputs": inputs,
        "backbone_config": dataclasses.asdict(config),
        "layout": {"names": list(layout.names), "compose": layout.compose, "global_head": layout.global_head},
        "windows": {"key": windows.key, "params": windows.params},
        "dataset": dataset,
        "data_key": windows.data_key,
        "device": device,
        "world_size": world,
        "deterministic": deterministic,
        "threads": torch.get_num_threads(),
    }


def resume_params(dataset: Dataset, name: str) -> tuple[TrainParams, str]:
    """The parameters and windows key an interrupted run was started with."""
    path = dataset.runs_dir / check_name(name, "run") / "config.json"
    if not path.is_file():
        raise NotFoundError(f"no run {name!r} in {dataset.runs_dir}", hint="see `mhr status` for runs")
    record = json.loads(path.read_text())
    return TrainParams.from_record(record["params"]), record["windows"]["key"]


def verify_run(run_dir: Path, hint: str) -> None:
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
            checkpoint.verify_file(run_dir / file, files[file]["sha256"], files[file]["size"], hint)


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
    verify_run(run_dir, hint)
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
    finally:
        con.close()
    params = TrainParams.from_record(record["params"])
    n_items = int(record["backbone_config"]["n_items"])
    specs = load_priors(dataset, params.priors, n_items, params.seed)
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
        model.load_state_dict(checkpoint.read_tensors(run_dir / "model.safetensors", hint))
    except RuntimeError as e:  # names or shapes that do not fit the config
        raise InputError(f"{run_dir / 'model.safetensors'} does not fit {run_dir / 'config.json'} ({e})",
                         hint=hint) from None
    model.to(device).eval()
    compat = Compatibility(layout, config.n_items, wref.event_vocab).to(device)
    refresh_eligibility(model, compat)
    return LoadedRun(name, run_dir, record, model, layout, compat, wref, specs)
