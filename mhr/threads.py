"""How many CPU threads torch computes with: the cores that are actually free, not all of them.

Torch's default is one intra-op thread per core. Beside other work that oversubscribes the machine:
each parallel region waits for its slowest thread, and a thread that shares its core with a busy
process runs at half speed or less, so the whole region does (benchmarks/bench_busy.py measured it).
`choose_threads` picks, in this order: `--threads` / `MHR_THREADS`; `OMP_NUM_THREADS` when the user
set it; else the cores this process may run on minus the ones the 1-minute load average says are
busy (at least 1). `apply_threads` does it once per command, before torch starts its thread pool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

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

    `cores`: the CPUs this process may run on (its affinity); `load`: the 1-minute load average of
    the machine's `total` CPUs (default: `cores`), rounded to whole busy cores."""
    for name in (ENV, "OMP_NUM_THREADS"):
        n = _count(env, name)
        if n is not None:
            return n
    total = cores if total is None else total
    busy = int(max(load, 0.0) + 0.5)
    return max(1, min(cores, total - busy))


def apply_threads(requested: int | None = None, env: MutableMapping[str, str] = os.environ) -> int:
    """Choose the thread count for this command and set it: through OMP_NUM_THREADS while torch is
    not imported yet (so its pool starts at that size), else with `torch.set_num_threads`."""
    given = dict(env)
    if requested is not None:
        given[ENV] = str(requested)
    n = choose_threads(len(os.sched_getaffinity(0)), os.getloadavg()[0], given, total=os.cpu_count())
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    elif not env.get("OMP_NUM_THREADS", "").strip():
        env["OMP_NUM_THREADS"] = str(n)
    return n
