"""`mhr data fetch movielens-100k`: the real ML-100K from GroupLens, or from PyPI when offline.

Route 1 is the GroupLens archive. Machines that reach only a package registry take route 2: the
copy of ML-100K inside the `recbole==1.2.1` wheel, fetched with `pip download --no-deps` (recbole
is never installed), its sha256 checked against the pin below, and the three atomic files read
straight from the zip. Both routes map to the same store (see `mhr.data.movielens`), and the stage
key is computed from the parsed content, so it is the same whichever route ran.

Downloads are cached in `<workspace>/.cache/movielens-100k/`; a cached download is reused without
touching the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from mhr.cache import file_sha256
from mhr.console import err
from mhr.data.imports import extract_zip
from mhr.data.ingest import BuildResult, build_store, ingest
from mhr.data.movielens import find_layout, read_movielens, read_recbole_100k
from mhr.data.source import Source, table_sha256
from mhr.errors import ExternalError, InputError, UsageError
from mhr.workspace import Dataset

DATASETS = ("movielens-100k",)
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ROUTES = ("auto", "grouplens", "recbole")


def cache_dir(dataset: Dataset) -> Path:
    return dataset.root / ".cache" / "movielens-100k"


def fetch(dataset: Dataset, name: str = "movielens-100k", route: str = "auto", force: bool = False,
          timeout: float = 10.0, discard_priors: bool = False) -> BuildResult:
    """Fetch ML-100K (from the cache, GroupLens or the recbole wheel) and build the store."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}", hint=f"available: {', '.join(DATASETS)}")
    if route not in ROUTES:
        raise UsageError(f"--route must be one of {', '.join(ROUTES)}, not {route!r}")
    src, used = _load(cache_dir(dataset), route, timeout)
    inputs = {"source": table_sha256(src.interactions, src.items, src.users)}
    err.print(f"movielens-100k from {used}: {src.interactions.num_rows:,} ratings")
    return build_store(
        dataset,
        "data fetch",
        {"dataset": name},
        inputs,
        lambda con: ingest(con, src),
        source=name,
        has_timestamps=True,
        force=force,
        discard_priors=discard_priors,
        run_params={"route": used},
    )


def _load(cache: Path, route: str, timeout: float) -> tuple[Source, str]:
    cache.mkdir(parents=True, exist_ok=True)
    archive, wheel = cache / "ml-100k.zip", cache / RECBOLE_WHEEL
    if route in ("auto", "grouplens") and archive.is_file():
        try:
            return _from_archive(archive, cache), "GroupLens archive (cached)"
        except InputError as e:
            if "damaged zip" not in e.message:
                raise
            err.print(f"[yellow]the cached {archive.name} is damaged; downloading it again[/]")
            archive.unlink(missing_ok=True)
    if route in ("auto", "recbole") and wheel.is_file() and file_sha256(wheel) == RECBOLE_SHA256:
        return _from_wheel(wheel, cache), "recbole wheel (cached)"
    if route in ("auto", "grouplens"):
        try:
            _download(GROUPLENS_URL, archive, timeout)
            return _from_archive(archive, cache), "GroupLens archive"
        except (OSError, urllib.error.URLError, zipfile.BadZipFile, InputError) as e:
            archive.unlink(missing_ok=True)
            if route == "grouplens":
                raise ExternalError(f"cannot download {GROUPLENS_URL}: {e}", hint="try --route recbole") from None
            err.print(f"[yellow]GroupLens unreachable ({e}); using the copy in the {RECBOLE} wheel on PyPI[/]")
    _pip_download(cache, timeout=max(timeout, 120))
    return _from_wheel(wheel, cache), "recbole wheel"


def _download(url: str, dest: Path, timeout: float) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
        shutil.copyfileobj(resp, f)
    zipfile.ZipFile(tmp).testzip()
    os.replace(tmp, dest)


def _pip_download(cache: Path, timeout: float) -> None:
    """`pip download --no-deps recbole==1.2.1` into a temp dir; keep the wheel only if it verifies."""
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", RECBOLE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ExternalError(f"pip download {RECBOLE} timed out after {timeout:.0f}s",
                                hint="check that PyPI is reachable") from None
        wheel = Path(tmp) / RECBOLE_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ExternalError(f"pip download {RECBOLE} failed: {tail[0]}",
                                hint="check that PyPI (or your pip index) is reachable")
        digest = file_sha256(wheel)
        if digest != RECBOLE_SHA256:
            raise ExternalError(f"{RECBOLE_WHEEL} has sha256 {digest}, expected {RECBOLE_SHA256}",
                                hint="your package index serves a different file; fetch from GroupLens instead")
        os.replace(wheel, cache / RECBOLE_WHEEL)


def _from_wheel(wheel: Path, cache: Path) -> Source:
    out = cache / "recbole-ml-100k"
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in RECBOLE_FILES:
            part = out / f".{name}.part"
            part.write_bytes(z.read(RECBOLE_DIR + name))
            os.replace(part, out / name)
    return read_recbole_100k(out)


def _from_archive(archive: Path, cache: Path) -> Source:
    out = cache / "ml-100k"
    if not (out / "u.data").is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            extract_zip(archive, Path(tmp))
            folder, _ = find_layout(Path(tmp))
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(folder, out)
    folder, ratings = find_layout(out)
    return read_movielens(folder, ratings)
