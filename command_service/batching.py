"""Group commit: the write commands of concurrent requests share one write-store transaction.

A durable commit costs a disk flush whatever it holds, so a transaction per request caps the
command API at what the store can flush one after the other. With group commit on
(``KESSAI_GROUP_COMMIT``), ``handlers.Recorder`` submits each route's command here and awaits
its own answer. The committer gathers commands until ``KESSAI_GROUP_COMMIT_MAX_BATCH`` are
waiting or the oldest has waited ``KESSAI_GROUP_COMMIT_MAX_DELAY_MS``, and hands the batch to
its ``commit`` function (``handlers.commit_batch``, the transaction) in a worker thread behind
the database bulkhead, one batch at a time; commands that arrive meanwhile form the next batch.

This module only gathers and hands over: it knows nothing of what a command is. If ``commit``
raises (the batch failed as a whole), every command of the batch is answered ``None``, and the
recorder records each alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger(__name__)

C = TypeVar("C")
"""A command."""
R = TypeVar("R")
"""Its result."""


@dataclass(slots=True)
class _Pending(Generic[C, R]):
    command: C
    future: asyncio.Future[R | None]
    enqueued_at: float


class GroupCommitter(Generic[C, R]):
    """Gathers the commands of concurrent requests and commits them in batches with ``commit``
    (one result per command, in order), one batch at a time."""

    def __init__(
        self,
        *,
        commit: Callable[[Sequence[C]], Sequence[R | None]],
        limiter: anyio.CapacityLimiter,
        max_batch: int,
        max_delay_seconds: float,
        registry: CollectorRegistry,
    ) -> None:
        self.commit = commit
        self.limiter = limiter
        self.max_batch = max_batch
        self.max_delay = max_delay_seconds
        self._registry = registry
        self.batch_size = Histogram(
            "kessai_group_commit_batch_size",
            "Requests recorded per group-commit transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
            registry=registry,
        )
        self.fallbacks = Counter(
            "kessai_group_commit_fallbacks",
            "Group commits that failed as a whole; their requests were recorded one by one.",
            registry=registry,
        )
        self.retries = Counter(
            "kessai_group_commit_retries",
            "Group commits decided and written again as a whole after losing a write race to "
            "another process (a wallet's or a payment's next version taken first): one per "
            "retry, counted by the commit function.",
            registry=registry,
        )
        self._queue: deque[_Pending[C, R]] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kessai-group-commit")

    async def aclose(self) -> None:
        """Commit what is queued, then stop; later commands are recorded alone."""
        self._closed = True
        self._arrived.set()
        self._full.set()
        if self._task is not None:
            await self._task
        self._registry.unregister(self.batch_size)
        self._registry.unregister(self.fallbacks)
        self._registry.unregister(self.retries)

    async def submit(self, command: C) -> R | None:
        """The result of ``command`` once its batch committed; ``None`` if it must be recorded
        alone (its batch failed as a whole, or the committer is closed).

        The wait cannot be cancelled, like a handler in a worker thread: a request whose
        client went away keeps its in-flight claim until its batch is done."""
        if self._closed or self._task is None or self._task.done():
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R | None] = loop.create_future()
        self._queue.append(_Pending(command, future, loop.time()))
        self._arrived.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                wait = self._queue[0].enqueued_at + self.max_delay - loop.time()
                if len(self._queue) < self.max_batch and wait > 0 and not self._closed:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._full.wait()
                take = min(self.max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                await self._flush(batch)
        finally:
            # Whatever stopped the loop, no request waits forever: they are recorded alone.
            while self._queue:
                pending = self._queue.popleft()
                if not pending.future.done():
                    pending.future.set_result(None)

    async def _flush(self, batch: list[_Pending[C, R]]) -> None:
        commands = [pending.command for pending in batch]
        results: Sequence[R | None]
        try:
            results = await anyio.to_thread.run_sync(
                lambda: self.commit(commands), limiter=self.limiter
            )
        except Exception as exc:  # every request is then recorded alone
            log.info(
                "group commit of %d requests failed (%s); recording them one by one",
                len(batch),
                type(exc).__name__,
            )
            self.fallbacks.inc()
            results = [None] * len(batch)
        else:
            self.batch_size.observe(len(batch))
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
