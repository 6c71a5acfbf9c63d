"""How many CPU threads torch computes with: the cores that are actually free, not all of them.

Torch's default is one intra-op thread per core. Beside other work that oversubscribes the machine:
each parallel region waits for its slowest thread, and a thread that shares its core with a busy
process runs at half speed or less, so the whole region does (benchmarks/bench_busy.py measured it).
`choose_threads` picks, in this order: `--threads` / `MHR_THREADS`; `OMP_NUM_THREADS` when the user
set it; else the cores this process may run on minus the ones other processes are busy on right now
(at least 1). "Right now" is `busy_now`: the runnable count of /proc/loadavg, sampled a few times over
~40 ms — the 1-minute load average (used where there is no /proc) lags by minutes: it still counts two
busy loops a minute after they stopped, and not yet the ones started a second ago.
`apply_threads` does it once per command, before torch starts its thread pool.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping

from mhr.errors import UsageError

ENV = "MHR_THREADS"


def _count(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        flag = "--threads" if name == ENV else name
        raise UsageError(f"{flag}={text!r} is not a positive whole number of threads",
                         hint=f"e.g. {flag}=2, or unset it to use the cores that are free")
    return int(text)


def choose_threads(cores: int, load: float, env: Mapping[str, str], total: int | None = None) -> int:
    """Threads for torch: `MHR_THREADS`, else a user's `OMP_NUM_THREADS`, else the free cores.

    `cores`: the CPUs this process may run on (its affinity); `load`: the busy cores of the
    machine's `total` CPUs (default: `cores`) — `busy_now` —, rounded to whole cores."""
    for name in (ENV, "OMP_NUM_THREADS"):
        n = _count(env, name)
        if n is not None:
            return n
    total = cores if total is None else total
    busy = int(max(load, 0.0) + 0.5)
    return max(1, min(cores, total - busy))


def _read_loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read()


def busy_now(read: Callable[[], str] = _read_loadavg, samples: int = 5, interval: float = 0.01) -> float:
    """How many other processes are running on the machine now: the median over `samples` reads of
    /proc/loadavg's runnable count ("R/total", which counts this process too) less one; the
    1-minute load average where /proc/loadavg cannot be read."""
    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            counts.append(int(read().split()[3].split("/")[0]) - 1)
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0]
    return max(0.0, float(statistics.median(counts)))


def apply_threads(requested: int | None = None, env: MutableMapping[str, str] = os.environ) -> int:
    """Choose the thread count for this command and set it: through OMP_NUM_THREADS while torch is
    not imported yet (so its pool starts at that size), else with `torch.set_num_threads`."""
    given = dict(env)
    if requested is not None:
        given[ENV] = str(requested)
    n = choose_threads(len(os.sched_getaffinity(0)), busy_now(), given, total=os.cpu_count())
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    elif not env.get("OMP_NUM_THREADS", "").strip():
        env["OMP_NUM_THREADS"] = str(n)
    return n
