"""Concurrent ranking requests as one scoring call.

The cost of a request is the backbone pass and the full-catalogue top-k; both are batched matmuls,
so B histories in one call cost far less than B calls. `MicroBatcher.rank` queues a request and
awaits its list; one consumer task takes whatever is queued (waiting up to `wait_s` for more when
it finds a single request), groups it by what must be equal within one call (`Job.key`: history
exclusion and any decoding-time objectives), and runs one `rank` call per group on a single worker
thread, so the event loop keeps accepting requests while the model runs. Under load requests pile
up during a call and go together in the next one; alone, a request waits at most `wait_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Job:
    """One request: an encoded history (item ids, timestamps), the store user id (-1: anonymous), how
    many items, and `key`: requests with equal keys may share a scoring call."""

    items: np.ndarray
    ts: np.ndarray
    user: int
    top: int
    key: Hashable = ()
    future: asyncio.Future = field(default=None, compare=False, repr=False)  # type: ignore[assignment]


# rank(histories, users, top, key) -> one result per history (a ranked list at least `top` long where the
# catalogue allows, which the caller cuts to its own length)
RankFn = Callable[[Sequence[tuple[np.ndarray, np.ndarray]], Sequence[int], int, Hashable], list[Any]]


class MicroBatcher:
    def __init__(self, rank: RankFn, max_batch: int = 64, wait_s: float = 0.002) -> None:
        self._rank = rank
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mhr-rank")
        self.calls = 0  # scoring calls made (for /health and the benchmark)
        self.requests = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def rank(self, items: np.ndarray, ts: np.ndarray, user: int, top: int, key: Hashable = ()) -> Any:
        """What `rank` gives for one history, computed together with whatever else is queued."""
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(Job(items, ts, user, top, key, future))
        return await future

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            if self._queue.empty() and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)  # alone: give concurrent requests a moment to join
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for key in dict.fromkeys(job.key for job in batch):
                await self._run([job for job in batch if job.key == key])

    async def _run(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.future.cancelled()]  # the client went away
        if not jobs:
            return
        top = max(j.top for j in jobs)
        loop = asyncio.get_running_loop()
        try:
            lists = await loop.run_in_executor(self._pool, self._rank, [(j.items, j.ts) for j in jobs],
                                               [j.user for j in jobs], top, jobs[0].key)
        except Exception as e:  # the error reaches every request of the call, never the consumer loop
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self.calls += 1
        self.requests += len(jobs)
        for j, result in zip(jobs, lists, strict=True):
            if not j.future.done():
                j.future.set_result(result)
