"""Stage keys, manifests and atomic artifact directories (DESIGN §2).

A stage's key is the sha256 of canonical JSON over {stage, params, keys of its inputs, format
version}. A directory artifact holds `manifest.json` with that key and the size and sha256 of
every file; it counts as done only when the manifest parses, the key matches and every file is
there with its recorded size and checksum. Existence or mtime never decide. Artifacts are built
in a temporary sibling directory and renamed into place, so an interrupted stage leaves nothing
that validates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def stage_key(stage: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """sha256 over the canonical description of a stage run."""
    body = {"stage": stage, "params": params, "inputs": inputs, "format_version": FORMAT_VERSION}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(
    directory: Path, stage: str, key: str, params: dict[str, Any], inputs: dict[str, str], **extra: Any
) -> dict[str, Any]:
    """Describe every file in `directory` and write `manifest.json` last (write + rename)."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "stage": stage,
        "key": key,
        "params": params,
        "inputs": inputs,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        **extra,
    }
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any] | None:
    """The manifest if the artifact is complete and intact, else None (never trusted half-way)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            return None
        for name, info in manifest["files"].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != info["size"]:
                return None
            if verify and file_sha256(path) != info["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_done(directory: Path, key: str) -> bool:
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("key") == key


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `final`, on error it is removed.

    The previous artifact at `final` stays intact until the new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build_artifact(
    final: Path,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    build: Any,
    force: bool = False,
) -> tuple[str, bool]:
    """Run `build(tmp_dir)` unless `final` already holds a valid artifact with the same key.

    Returns (key, cached). `build` writes its files into the temporary directory it is given and
    may return a dict of extra manifest fields; the manifest is written last, then the directory is
    renamed into place.
    """
    key = stage_key(stage, params, inputs)
    if not force and is_done(final, key):
        return key, True
    with atomic_dir(final) as tmp:
        extra = build(tmp)
        extra = extra if isinstance(extra, dict) else {}
        write_manifest(tmp, stage, key, params, inputs, **extra)
    return key, False
