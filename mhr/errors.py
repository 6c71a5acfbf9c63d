"""Every error a user can cause, in one place.

Each carries a one-line message naming the file, row or column at fault and a hint saying how to
fix it; the command line's `main` prints them as one red line plus the hint and exits non-zero.
"""

from __future__ import annotations


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
