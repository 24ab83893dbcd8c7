"""Coalescing of in-flight work: one task per key, every waiter gets its result or its error.

Unlike distribution's ``inflight`` map (a second caller goes upstream again) and zot's one-value
channel (only one waiter hears about a failure), every caller of :meth:`SingleFlight.run` awaits
the same task, shielded: a caller that is cancelled (its client went away) does not cancel the
work for the others. The key is dropped when the task ends, so the next call starts afresh.

This is per process. Across replicas, see the Redis lock in ``storage`` (issue #4's design).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    def start(self, key: K, work: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The running task for ``key``, or a new one running ``work()``."""
        task = self._tasks.get(key)
        if task is None or task.done():  # a finished task's key goes one loop turn later
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return task

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """Await the shared task for ``key`` (started if needed)."""
        return await asyncio.shield(self.start(key, work))

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters, if any, re-raise it themselves
