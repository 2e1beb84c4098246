"""What every phase of a run works with: the two databases, the settings, and the run's pace.

A phase is a function that takes values and returns values; it reaches the databases only
through ``RunContext`` and opens its own connections (each phase says where its transactions
begin). ``checkpoint`` ends the run between two steps (a stop signal, or the lock lost to another
run); ``sleep`` waits, but wakes at once on a stop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.settings import Settings

T = TypeVar("T")
K = TypeVar("K", str, uuid.UUID)
ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class RunContext:
    write: Engine
    read: Engine
    settings: Settings
    checkpoint: Callable[[], None]
    """Raise if the run must end here (a stop signal, or the lock lost)."""
    sleep: Callable[[float], Awaitable[None]]
    """Wait that long (a stop ends the wait and the run)."""
    pause_seconds: float = 0.0
    """A pause between two blocks of payments (a throttled full audit)."""

    @property
    def parallel(self) -> bool:
        """Whether work may overlap. SQLite: one thing at a time (its transactions lock the
        file, and two threads each holding one database while waiting for the other
        deadlock)."""
        return "sqlite" not in (self.write.dialect.name, self.read.dialect.name)

    def in_write(self, fn: Callable[[sa.Connection], T]) -> T:
        """``fn`` on a write-store connection, returned to the pool at once (read only)."""
        with self.write.connect() as conn:
            return fn(conn)

    def in_read(self, fn: Callable[[sa.Connection], T]) -> T:
        """``fn`` on a read-database connection, returned to the pool at once (read only)."""
        with self.read.connect() as conn:
            return fn(conn)

    async def wait_until_right(
        self, keys: Collection[K], still_wrong: Callable[[list[K]], Iterable[K]]
    ) -> set[K]:
        """After a repair: look again every 0.2 s (``still_wrong`` in a worker thread, given
        the keys still wrong, in order) until none is, or ``reconcile_verify_timeout_seconds``
        pass; the keys still wrong then."""
        remaining = set(keys)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reconcile_verify_timeout_seconds
        while remaining:
            remaining = set(await asyncio.to_thread(still_wrong, sorted(remaining)))
            if not remaining or loop.time() > deadline:
                break
            await self.sleep(0.2)
        return remaining
