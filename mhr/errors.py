"""Every error a user can cause, in one place.

Each carries a one-line message naming the file, row or column at fault and a hint saying how to
fix it; the command line's `main` prints them as one red line plus the hint and exits non-zero.
"""

from __future__ import annotations

import errno
import os


class MhrError(Exception):
    """Base of all user-facing errors. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InputError(MhrError):
    """Bad input data: a file, row or column that cannot be used as given."""

    exit_code = 2


class UsageError(MhrError):
    """Bad options: unknown names, values out of range, contradictory flags."""

    exit_code = 2


class NotFoundError(MhrError):
    """A dataset, prior, artifact, run or user that does not exist."""

    exit_code = 3


class BusyError(MhrError):
    """Another process is writing the same dataset (or run). `holder` says who ("priors build (pid
    12)"), `pid` is its process id when known."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None = None, holder: str = "another process",
                 pid: int | None = None) -> None:
        super().__init__(message, hint)
        self.holder = holder
        self.pid = pid


class StaleError(MhrError):
    """An artifact was built from inputs that no longer match (keys differ)."""

    exit_code = 5


class TrainingError(MhrError):
    """Training cannot go on (NaN loss, incompatible checkpoint, model too large)."""

    exit_code = 6


class ExternalError(MhrError):
    """A download or an LLM endpoint failed after retries."""

    exit_code = 7


class DiskError(MhrError):
    """The system refused a read or write: disk full, quota exceeded, no permission (exit 1)."""

    exit_code = 1


class DamagedStoreError(InputError):
    """A dataset store that is truncated or corrupt: it must be rebuilt from its source."""


DISK_FULL_HINT = ("free some space (or point --workspace / MHR_WORKSPACE at a larger disk, or raise the file-size "
                  "limit, `ulimit -f`) and rerun; nothing half-written was kept")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# how libraries that wrap the OSError say it: DuckDB ("Could not write file …: No space left on
# device"), safetensors ("I/O error: File too large (os error 27)")
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_full_error(e: BaseException) -> DiskError | None:
    """The one-line DiskError for a write the disk refused (full, over quota, over the file-size
    limit), whatever library raised it (an OSError, DuckDB's IO/Transaction/Fatal exceptions,
    safetensors' SafetensorError), looking through the causes; None for any other error."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).strip()
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL_ERRNOS:
            where = f": {cur.filename}" if cur.filename else ""
            return DiskError(f"{cur.strerror or os.strerror(cur.errno)}{where}", hint=DISK_FULL_HINT)
        if any(m in text for m in _DISK_FULL_TEXT):
            first = text.splitlines()[0]
            return DiskError(f"the disk refused a write: {first}", hint=DISK_FULL_HINT)
        cur = cur.__cause__ or cur.__context__
    return None


def refuse_non_finite(params: object) -> None:
    """UsageError for the first float field of the dataclass `params` that is NaN or ±inf (they slip
    past every range check: `nan < 0` is False), named as its flag `--field-name`."""
    import dataclasses
    import math

    for f in dataclasses.fields(params):  # type: ignore[arg-type]
        value = getattr(params, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name.replace('_', '-')} {value} is not a finite number",
                             hint="give an ordinary number, e.g. 0.5")


EXIT_CODES = (
    (0, "ok"),
    (1, "unexpected error, or the system refused a write (disk full, permissions)"),
    (2, "bad usage or bad input data"),
    (3, "not found"),
    (4, "busy: another process is writing the dataset"),
    (5, "stale: an artifact no longer matches its inputs"),
    (6, "training cannot go on"),
    (7, "external: a download or an LLM endpoint failed"),
    (130, "interrupted (Ctrl-C)"),
    (143, "terminated (SIGTERM), cleaned up as after a Ctrl-C"),
)
