import multiprocessing as mp
from pathlib import Path

import pytest

from mhr.errors import BusyError, UsageError
from mhr.workspace import Workspace, check_name, writing


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "a b", ".hidden"])
def test_bad_dataset_names_rejected(bad):
    with pytest.raises(UsageError):
        check_name(bad)


def _hold(path, started, release):
    ds = Workspace(Path(path)).dataset("d")
    with writing(ds, "priors build"):
        started.set()
        release.wait(10)


def test_second_writer_is_busy(tmp_path: Path):
    ctx = mp.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), started, release))
    p.start()
    try:
        assert started.wait(20)
        with pytest.raises(BusyError, match="busy: priors build .* is writing d"):
            with writing(Workspace(tmp_path).dataset("d"), "data import"):
                pass
    finally:
        release.set()
        p.join()
    with writing(Workspace(tmp_path).dataset("d"), "data import"):
        pass
