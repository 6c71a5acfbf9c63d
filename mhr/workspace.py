"""Where artifacts live: `<workspace>/<dataset>/{store.duckdb, windows/, runs/, reports/}`.

The workspace root is `--workspace` / `MHR_WORKSPACE` (default `./workspace`); the dataset is
`--dataset` / `MHR_DATASET`, or the only dataset in the workspace.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mhr.errors import DiskError, NotFoundError, UsageError
from mhr.store import check_store_folder

STORE_FILE = "store.duckdb"
CURRENT_FILE = "current.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "dataset") -> str:
    """A dataset, prior or run name: letters, digits, `.`, `_`, `-`; no path separators, no `..`."""
    if not _NAME.match(name) or ".." in name:
        raise UsageError(
            f"invalid {what} name {name!r}: only letters, digits, '.', '_' and '-' are allowed "
            "(no path separators, no '..', at most 64 characters)",
            hint="pick a plain name such as 'ml-100k' for --name",
        )
    return name


@dataclass(frozen=True)
class Dataset:
    """One dataset's folder in the workspace."""

    root: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def store_path(self) -> Path:
        return self.dir / STORE_FILE

    @property
    def windows_dir(self) -> Path:
        return self.dir / "windows"

    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.dir / "reports"

    @property
    def current_path(self) -> Path:
        return self.dir / CURRENT_FILE

    def exists(self) -> bool:
        return self.store_path.is_file()

    def require(self) -> Dataset:
        if not self.exists():
            raise NotFoundError(
                f"dataset {self.name!r} has no store at {self.store_path}",
                hint="create it with `mhr data fetch movielens-100k`, `mhr data import` or `mhr data synth`",
            )
        return self


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_option(cls, root: str | Path | None) -> Workspace:
        path = Path(root or os.environ.get("MHR_WORKSPACE") or "workspace").resolve()
        check_store_folder(path)
        if path.exists() and not path.is_dir():
            raise UsageError(f"the workspace {path} is a file, not a folder",
                             hint="point --workspace / MHR_WORKSPACE at a folder (it is created if missing)")
        return cls(path)

    def datasets(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / STORE_FILE).is_file())

    def dataset(self, name: str | None = None) -> Dataset:
        """The named dataset (need not exist yet), `MHR_DATASET`, or the only one there is."""
        name = name or os.environ.get("MHR_DATASET")
        if name:
            return Dataset(self.root, check_name(name))
        names = self.datasets()
        if len(names) == 1:
            return Dataset(self.root, names[0])
        if not names:
            raise NotFoundError(
                f"no dataset in workspace {self.root}",
                hint="create one with `mhr data fetch movielens-100k` (or `mhr data import` / `mhr data synth`)",
            )
        raise UsageError(
            f"several datasets in {self.root} ({', '.join(names)}): say which",
            hint="pass --dataset NAME or set MHR_DATASET",
        )


@contextmanager
def writing(dataset: Dataset, stage: str) -> Iterator[None]:
    """Hold the dataset's write lock for the duration of a stage.

    A second writer gets `busy: <stage> is writing <dataset>` at once instead of waiting or
    corrupting the store. The lock is an `flock` on `<dataset>/.lock`, released by the kernel if the
    process dies, so a killed stage never leaves the dataset locked.
    """
    from mhr.cache import locked

    path = dataset.dir / ".lock"
    try:
        dataset.dir.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as e:
        raise DiskError(
            f"cannot write {e.filename or path}: {e.strerror or e}",
            hint=f"the workspace {dataset.root} must be a writable folder (--workspace / MHR_WORKSPACE)",
        ) from None
    with locked(path, f"{stage} (pid {os.getpid()})", dataset.name):
        yield


def read_current(dataset: Dataset) -> dict[str, str]:
    """What the user last chose for the dataset: `{"windows": <key>, "run": <name>}` (either may be absent).

    Commands that take no explicit reference use these instead of guessing by time. An unreadable
    record counts as none (it is only ever replaced whole, so that needs a hand edit).
    """
    try:
        record = json.loads(dataset.current_path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(
        record, dict) else {}


def current_run(dataset: Dataset) -> str:
    """The run `mhr eval` uses when given none: the last one `mhr train` finished (or found cached), as
    recorded in the dataset's `current.json`; without a record, the only finished run. Never the newest
    by time: a recorded run that is gone, or several runs and no record, is an error listing them."""
    finished = sorted(p.parent.name for p in dataset.runs_dir.glob("*/manifest.json")) \
        if dataset.runs_dir.is_dir() else []
    listing = ", ".join(finished[:12]) + (f" … ({len(finished)} in all)" if len(finished) > 12 else "")
    recorded = read_current(dataset).get("run")
    if recorded in finished:
        return recorded
    if recorded:
        raise NotFoundError(f"the current run {recorded!r} (from the last `mhr train`) is missing or unfinished "
                            f"in {dataset.runs_dir}; finished: {listing or 'none'}",
                            hint="name one: `mhr eval RUN`")
    if not finished:
        raise NotFoundError(f"no finished run in {dataset.runs_dir}", hint="train one with `mhr train`")
    if len(finished) > 1:
        raise UsageError(f"several runs and none chosen: {listing}", hint="name one: `mhr eval RUN`")
    return finished[0]


def record_current(dataset: Dataset, **choices: str) -> None:
    """Make `choices` (e.g. `windows=key`, `run=name`) the dataset's current ones.

    Read-modify-write under a short `flock` (a windows build and a training run may finish at the same
    moment), written to a temp file and renamed, so a reader sees the old record or the new one.
    """
    dataset.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(dataset.dir / ".current.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = {**read_current(dataset), **choices}
        tmp = dataset.current_path.with_name(f".{CURRENT_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, dataset.current_path)
    finally:
        os.close(fd)  # releases the lock
