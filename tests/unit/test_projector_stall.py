"""The projector's stall watchdog (``projector.watchdog``), with a stand-in consumer.

A partition whose position stays put while the log holds records past it, or that never
gets a fetch answer, is sought again to its stored offsets after ``STALL_SECONDS``; a
partition at the end of its log, or moving, is left alone. (The broker-level cause was seen
once in CI, and not reproduced since: a restarted projector that was assigned its partitions
and sought them, then received nothing.)
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from aiokafka import TopicPartition

from kessai.settings import Settings
from projector import stored_offsets, watchdog
from projector.service import Projector


class Consumer:
    def __init__(self, positions: dict[int, int], highwaters: dict[int, int | None]) -> None:
        self.positions, self.highwaters = positions, highwaters

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("payments", p) for p in self.positions}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters[tp.partition]

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp.partition]


@pytest.fixture
def projector(monkeypatch: pytest.MonkeyPatch) -> tuple[Projector, list[list[int]], list[float]]:
    clock = [1000.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    projector = Projector(engine=sa.create_engine("sqlite://"), settings=Settings(topic="payments"))
    sought: list[list[int]] = []

    async def seek(tps: Sequence[TopicPartition]) -> None:
        sought.append(sorted(tp.partition for tp in tps))

    monkeypatch.setattr(projector, "_seek_to_stored", seek)
    monkeypatch.setattr(stored_offsets, "stamp_caught_up", lambda engine, topic, positions: None)
    return projector, sought, clock


async def advance(projector: Projector, clock: list[float], seconds: float) -> None:
    """Run the once-a-second check every second for ``seconds``."""
    for _ in range(int(seconds)):
        clock[0] += 1.0
        await projector._idle_checks()


async def test_a_partition_that_stays_behind_its_log_end_is_sought_again(
    projector: tuple[Projector, list[list[int]], list[float]],
) -> None:
    p, sought, clock = projector
    # 0: stuck behind its log end; 1: never got a fetch answer; 2: at its log end; 3: moving.
    consumer = Consumer({0: 5, 1: 0, 2: 9, 3: 0}, {0: 40, 1: None, 2: 9, 3: 50})
    p._consumer = consumer  # type: ignore[assignment]
    p.expected = {0: 5, 1: 0, 2: 9, 3: 0}
    for _ in range(int(watchdog.STALL_SECONDS) - 1):
        consumer.positions[3] += 1
        await advance(p, clock, 1)
    assert sought == []
    for _ in range(3):
        consumer.positions[3] += 1
        await advance(p, clock, 1)
    assert sought == [[0, 1]]
    # Sought once, not on every check after that: the clock of each starts again.
    await advance(p, clock, 5)
    assert sought == [[0, 1]]


async def test_a_partition_waiting_its_turn_while_others_are_applied_is_left_alone_longer(
    projector: tuple[Projector, list[list[int]], list[float]],
) -> None:
    p, sought, clock = projector
    # A consumer behind its log: partition 1's turn has not come yet while batches of
    # partition 0 are applied one after the other.
    consumer = Consumer({0: 0, 1: 0}, {0: 10**9, 1: 10**9})
    p._consumer = consumer  # type: ignore[assignment]
    p.expected = {0: 0, 1: 0}

    async def applying(seconds: float) -> None:
        for _ in range(int(seconds)):
            consumer.positions[0] += 2_000
            p._last_applied = clock[0]
            await advance(p, clock, 1)

    await applying(watchdog.STALL_SECONDS + 5)
    assert sought == []
    await applying(watchdog.BUSY_STALL_SECONDS - watchdog.STALL_SECONDS)
    assert sought == [[1]]  # still stuck after the longer wait: sought
    # Partition 0 caught up, nothing is applied any more: the ordinary wait applies again.
    consumer.highwaters[0] = consumer.positions[0]
    await advance(p, clock, watchdog.STALL_SECONDS + 2)
    assert sought == [[1], [1]]
