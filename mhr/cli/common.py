"""What every command shares: the workspace/dataset context and option helpers."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from mhr.workspace import Dataset, Workspace


@dataclass(frozen=True)
class Context:
    """Set once by the root callback from --workspace/--dataset/--verbose; passed, never global."""

    workspace: Workspace
    dataset_name: str | None
    verbose: bool

    def dataset(self, name: str | None = None) -> Dataset:
        """The dataset to work on (must exist)."""
        return self.workspace.dataset(name or self.dataset_name).require()

    def new_dataset(self, name: str | None) -> Dataset:
        """A dataset that a data command is about to create (may exist: it is replaced atomically)."""
        return self.workspace.dataset(name or self.dataset_name)


def context(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context), "root callback did not run"
    return obj


def parse_list(value: str | None, cast=str) -> list:
    """'a,b, c' -> ['a', 'b', 'c'] (empty or None -> [])."""
    if not value:
        return []
    return [cast(v.strip()) for v in value.split(",") if v.strip()]
