"""Stage keys, manifests and atomic artifact directories.

A stage's key is the sha256 of canonical JSON over {stage, params, keys of its inputs, format
version}. A directory artifact holds `manifest.json` with that key and the size and sha256 of
every file; it counts as done only when the manifest parses, the key matches and every file is
there with its recorded size and checksum. Existence or mtime never decide. Artifacts are built
in a temporary sibling directory and renamed into place, so an interrupted stage leaves nothing
that validates.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mhr.errors import BusyError, UsageError

FORMAT_VERSION = 1
T = TypeVar("T")
MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or ±inf float (also inside numpy scalars, lists, tuples and dicts) as None:
    JSON has no token for them, and strict parsers reject the `NaN` / `Infinity` Python would write."""
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0):
        value = obj.item() if hasattr(obj, "item") else obj
        return None if isinstance(value, float) and not math.isfinite(value) else value
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """The one way an artifact's JSON is written: `json.dumps` of `json_safe(obj)` with allow_nan=False."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any, **kwargs: Any) -> Path:
    """`dumps_json(obj)` into `path`, written beside it under a name carrying the writer's pid (which
    `mhr gc` recognises) and renamed into place: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(dumps_json(obj, **kwargs))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
    write_json(directory / MANIFEST, manifest, indent=2, sort_keys=True, default=str)
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


# ---------------------------------------------------------------------------------------------
# locks on one artifact, and what killed writers leave behind


@contextmanager
def locked(path: Path, holder: str, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if need be) for the block, with `holder` written
    in it; a second taker gets BusyError naming the holder at once. The kernel releases the lock
    when the process dies, so a killed writer never leaves `what` locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            pid = re.search(r"\(pid (\d+)\)", other)
            raise BusyError(f"busy: {other} is writing {what}",
                            hint="wait for it to finish (or stop it) and run this again",
                            holder=other, pid=int(pid.group(1)) if pid else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def wait_while_busy(call: Callable[[], T], timeout: float, poll: float = 1.0) -> T:
    """`call()`, tried again while a lock it needs is held by another live process: one line names
    the holder ("waiting for priors build (pid 12)"), then a new try every `poll` seconds for at most
    `timeout` seconds, after which the BusyError stands. A lock this process holds is not waited for."""
    from mhr.console import err

    deadline, shown = time.monotonic() + timeout, None
    while True:
        try:
            return call()
        except BusyError as e:
            if e.pid == os.getpid() or time.monotonic() + poll > deadline:
                raise
            if e.holder != shown:
                err.print(f"[yellow]waiting for {e.holder}[/] ({e.message}; for up to {timeout:.0f} s)")
                shown = e.holder
            time.sleep(poll)


def lock_path(artifact: Path) -> Path:
    """The lock of an artifact directory `<dataset>/<kind>/<name>`: `<dataset>/.locks/<kind>-<name>.lock`,
    outside the artifact (a rebuild removes it) and outside its kind's folder (taking the lock writes
    the holder, and a cached rerun must leave that folder untouched)."""
    return artifact.parent.parent / ".locks" / f"{artifact.parent.name}-{artifact.name}.lock"


def lock_holder(path: Path) -> str | None:
    """Who holds the lock at `path` (what they wrote in it), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# temp names carry their writer's pid: `.X.tmp-PID` / `.X.old-PID` (atomic_dir, new_store, checkpoints),
# with a suffix DuckDB adds (`.wal`, `.tmp`), `.spill-.X.tmp-PID` (windows) and `.X.PID.tmp`
_TEMP_NAME = re.compile(r"(?:\.(?:tmp|old)-(\d+)(?:\.[A-Za-z]+)?|\.(\d+)\.tmp)$")


@dataclass(frozen=True)
class Leftover:
    """A temporary file or folder whose writer (the pid in its name) is no longer running."""

    path: Path
    pid: int
    size: int


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


def _only_copy(folder: Path, name: str, m: re.Match) -> bool:
    """An `.old-PID` whose replacement never landed (the writer died between its two renames) is
    the artifact's only intact version: not a leftover (`atomic_dir`'s `.X.old-PID`, a run's
    `checkpoint.old-PID`, which `mhr train --resume` puts back)."""
    if ".old-" not in m.group(0):
        return False
    final = name[: m.start()]
    final = final[1:] if final.startswith(".") and not (folder / final).exists() else final
    return not (folder / final).exists()


def find_leftovers(root: Path) -> list[Leftover]:
    """Temporary files and folders under `root` left by processes that are gone (killed mid-write).

    A name without a pid is never matched, nor one whose pid is alive (it may be writing now; a pid
    reused by an unrelated process only delays the clean-up)."""
    found: list[Leftover] = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs) + sorted(files):
            m = _TEMP_NAME.search(name)
            if not m:
                continue
            pid = int(m.group(1) or m.group(2))
            if pid_alive(pid) or _only_copy(Path(folder), name, m):
                continue
            path = Path(folder) / name
            found.append(Leftover(path, pid, _size(path)))
            if name in dirs:
                dirs.remove(name)  # counted whole; not walked into
    return sorted(found, key=lambda x: str(x.path))


def remove_leftovers(root: Path, dry_run: bool = False) -> list[Leftover]:
    """Delete what `find_leftovers` finds (each pid checked again just before); returns them."""
    removed = []
    for item in find_leftovers(root):
        if pid_alive(item.pid):
            continue
        if not dry_run:
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                item.path.unlink(missing_ok=True)
        removed.append(item)
    return removed


# ---------------------------------------------------------------------------------------------
# where a command may write a file the user named (`--out`)

_STORE_FILE = "store.duckdb"  # mhr.workspace.STORE_FILE: what marks a folder as a dataset


def _what_is(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def check_output(out: Path, flag: str = "--out", folder: bool = False) -> Path:
    """`out` if a command may write there: a new path, or an existing regular file (a folder when
    `folder`), and nowhere inside a dataset's folder (its store, windows, runs) but its `reports/`.
    Anything else is refused with a UsageError before a byte is written: renaming a finished file
    over a device, FIFO or socket would replace it (`--out /dev/null` as root), and one inside a
    dataset would replace what the workspace owns."""
    out = Path(out)
    try:
        mode = os.stat(out).st_mode  # follows a link: what would be written through it
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise UsageError(f"{flag} {out}: {e.strerror}", hint="name a file in a folder you can write") from None
    if mode is not None and not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        want = "a folder (or a new path)" if folder else "a new or regular file"
        raise UsageError(f"{flag} {out} is {_what_is(mode)}, not {want}: mhr will not write over it",
                         hint="name " + ("a folder, e.g. report/" if folder else "a file, e.g. recs.parquet"))
    resolved = out.resolve()
    for parent in (resolved, *resolved.parents):
        if (parent / _STORE_FILE).is_file():
            inside = resolved.relative_to(parent).parts
            if not inside or inside[0] != "reports":
                raise UsageError(f"{flag} {out} is inside the dataset folder {parent}, which mhr owns",
                                 hint=f"write outside it, or under {parent / 'reports'}")
            break
    return out


def sweep_temps(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` (`.NAME.PID.tmp`, `.NAME.tmp-PID`) left by writers
    that were killed (kill -9 runs no clean-up), so a rerun to the same path cleans up after them;
    a live writer's temp is kept. Returns what was removed."""
    removed = []
    prefix = f".{final.name}."
    try:
        names = [n for n in os.listdir(final.parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.search(name)
        if m is None or name[: m.start()] != f".{final.name}" or ".old-" in m.group(0):
            continue
        if pid_alive(int(m.group(1) or m.group(2))):
            continue
        path = final.parent / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
