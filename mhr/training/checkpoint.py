"""A run's weights and checkpoints: safetensors + JSON, never pickles.

`checkpoint/` holds `model.safetensors`, `optimizer.safetensors` (the optimizer's tensors and the
RNG states) and `state.json` (step, best validation figures, optimizer and scheduler settings, and
the sha256 of both tensor files). Each file's sha256 is recorded when written and checked before
use, so damaged weights fail loudly instead of scoring everything 0. A checkpoint is written whole
through `cache.atomic_dir`: a trainer killed between its two renames leaves the previous one as
`.checkpoint.old-PID` (`checkpoint.old-PID` before that helper was used), which `recover` puts back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mhr.cache import atomic_dir, dumps_json, file_sha256
from mhr.errors import InputError, TrainingError

TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


def verify_file(path: Path, digest: str, size: int | None, hint: str) -> None:
    if not path.is_file():
        raise InputError(f"{path} is missing", hint=hint)
    if (size is not None and path.stat().st_size != size) or file_sha256(path) != digest:
        raise InputError(f"{path} is damaged: its sha256 differs from the one recorded when it was written",
                         hint=hint)


def read_tensors(path: Path, hint: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error for a bad header, OSError, …: all mean damaged
        raise InputError(f"{path} is damaged or truncated ({type(e).__name__}: {e})", hint=hint) from None


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # the pid tells `mhr gc` whose it is
    save_file(_cpu_state(model), tmp)
    os.replace(tmp, path)


def save(path: Path, model, optimizer, scheduler, gen: torch.Generator, state: dict) -> None:
    """Write the checkpoint directory `path` whole (the previous one stays until this one is complete)."""
    with atomic_dir(path) as tmp:
        save_file(_cpu_state(model), tmp / "model.safetensors")
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
                "sha256": {f: file_sha256(tmp / f) for f in TENSOR_FILES}}
        (tmp / "state.json").write_text(dumps_json(full, indent=1, default=float))


def recover(path: Path) -> None:
    """A trainer killed between `save`'s two renames left its previous checkpoint as
    `.checkpoint.old-PID` (or, written by older versions, `checkpoint.old-PID`) and none in place: put
    that one back (the newest, if several)."""
    olds = [*path.parent.glob(f".{path.name}.old-*"), *path.parent.glob(f"{path.name}.old-*")]
    olds = sorted(olds, key=lambda p: p.stat().st_mtime)
    if olds and (olds[-1] / "state.json").is_file():
        os.replace(olds[-1], path)


def load(path: Path, model, optimizer, scheduler, gen: torch.Generator) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from `path`; returns its training state."""
    hint = "start the run over with --force"
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"checkpoint {path / 'state.json'} is damaged ({e})", hint=hint) from None
    for file, digest in state.get("sha256", {}).items():  # checkpoints written before hashes: none
        verify_file(path / file, digest, None, hint)
    weights = read_tensors(path / "model.safetensors", hint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint {path} does not fit this model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})",
            hint="resume with the run's own config, or train anew with --force",
        )
    tensors = read_tensors(path / "optimizer.safetensors", hint)
    opt_state: dict[int, dict] = {int(pid): dict(meta) for pid, meta in state["optimizer"]["state"].items()}
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


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
