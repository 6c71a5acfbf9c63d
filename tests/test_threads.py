"""The thread count every command starts with: the values `choose_threads` picks, and how
`apply_threads` hands them to torch."""

from __future__ import annotations

import pytest
import torch

from mhr.errors import UsageError
from mhr.threads import apply_threads, busy_now, choose_threads


@pytest.mark.parametrize("cores, load, env, total, want", [
    (2, 0.0, {}, None, 2),  # a quiet machine: every core
    (2, 0.4, {}, None, 2),  # background noise is not a busy core
    (2, 0.6, {}, None, 1),
    (2, 2.0, {}, None, 1),  # two busy loops beside us: one thread, never none
    (2, 9.5, {}, None, 1),
    (16, 3.2, {}, None, 13),
    (4, 1.0, {}, 16, 4),  # 4 CPUs of a 16-CPU machine with one busy: our 4 are free
    (4, 14.0, {}, 16, 2),
    (2, 0.0, {"OMP_NUM_THREADS": "1"}, None, 1),  # the user's OpenMP setting is kept
    (2, 2.0, {"OMP_NUM_THREADS": "4"}, None, 4),
    (2, 2.0, {"MHR_THREADS": "2", "OMP_NUM_THREADS": "1"}, None, 2),  # ours wins
    (8, 0.0, {"OMP_NUM_THREADS": " "}, None, 8),  # empty: not set
])
def test_choose_threads(cores, load, env, total, want):
    assert choose_threads(cores, load, env, total=total) == want


@pytest.mark.parametrize("env", [{"MHR_THREADS": "0"}, {"OMP_NUM_THREADS": "two"}, {"MHR_THREADS": "-1"}])
def test_bad_counts_name_the_setting(env):
    with pytest.raises(UsageError, match=next(iter(env)).replace("MHR_THREADS", "--threads")):
        choose_threads(2, 0.0, env)


def test_apply_threads_sets_torch_once_it_is_imported():
    before = torch.get_num_threads()
    try:
        assert apply_threads(1, env={}) == 1 and torch.get_num_threads() == 1
        env = {"OMP_NUM_THREADS": "1"}
        assert apply_threads(None, env=env) == 1 and env == {"OMP_NUM_THREADS": "1"}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("reads, want", [
    (["0.00 0.00 0.00 1/180 99"] * 5, 0.0),  # only this process runs
    (["1.90 1.20 0.40 3/181 99"] * 5, 2.0),  # two busy loops beside it
    (["9.00 9.00 9.00 1/180 99"] * 5, 0.0),  # a high 1-minute average from loops that have stopped
    (["0 0 0 1/9 1", "0 0 0 6/9 1", "0 0 0 1/9 1", "0 0 0 2/9 1", "0 0 0 1/9 1"], 0.0),  # a blip
    (["0 0 0 3/9 1", "0 0 0 3/9 1", "0 0 0 2/9 1", "0 0 0 3/9 1", "0 0 0 4/9 1"], 2.0),
])
def test_busy_now_reads_the_runnable_count_not_the_average(reads, want):
    it = iter(reads)
    assert busy_now(lambda: next(it), interval=0) == want


def test_busy_now_falls_back_to_the_load_average(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (1.5, 1.0, 0.5))
    assert busy_now(lambda: "garbage", interval=0) == 1.5

    def unreadable() -> str:
        raise OSError("no /proc")

    assert busy_now(unreadable, interval=0) == 1.5
