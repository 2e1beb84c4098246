"""The projector's reset check (``reset_check.logs_match``) with a stand-in probe consumer.

All partitions are decided by one probe; a high watermark below the stored offset is a reset at
once; a partition with no answer stays undecided; a CancelledError raised inside aiokafka (not a
cancellation of the projector) is a failed check, never a crash, while a real cancellation of
the projector still propagates. (Seen once: the projector died of a CancelledError raised in
the reset check after a broker restart.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from aiokafka import TopicPartition

from kessai import offsets
from kessai.settings import Settings
from projector import reset_check


class Record:
    def __init__(self, offset: int, event_id: str) -> None:
        self.offset = offset
        self.headers = [("event_id", event_id.encode())]


class Probe:
    """Answers each partition from ``log``: partition -> (high watermark, event ids by
    offset); partitions missing from ``log`` never get an answer."""

    log: ClassVar[dict[int, tuple[int, dict[int, str]]]] = {}
    fail_with: ClassVar[BaseException | None] = None
    instances: ClassVar[list[Probe]] = []

    def __init__(self, **_: Any) -> None:
        self._client = object()
        self.positions: dict[TopicPartition, int] = {}
        self.fetched: set[TopicPartition] = set()
        self.stopped = False
        Probe.instances.append(self)

    async def start(self) -> None:
        pass

    def assign(self, tps: Sequence[TopicPartition]) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tp: TopicPartition) -> None:
        pass

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[Record]]:
        if self.fail_with is not None:
            raise self.fail_with
        await asyncio.sleep(0.01)
        out = {}
        for tp in tps:
            if tp.partition not in self.log:
                continue
            self.fetched.add(tp)
            end, events = self.log[tp.partition]
            offset = self.positions[tp]
            if offset < end:
                out[tp] = [Record(offset, events.get(offset, "other"))]
        return out

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.log[tp.partition][0] if tp in self.fetched else None

    async def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    Probe.log, Probe.fail_with, Probe.instances = {}, None, []
    monkeypatch.setattr(reset_check, "AIOKafkaConsumer", Probe)
    monkeypatch.setattr(reset_check, "refuse_auto_creation", lambda client: None)
    monkeypatch.setattr(reset_check, "PROBE_SECONDS", 0.3)
    return Settings(topic="payments")


def rows(**stored: tuple[int, str]) -> dict[TopicPartition, offsets.OffsetRow]:
    return {
        TopicPartition("payments", int(p[1:])): offsets.OffsetRow(n, event, None, None)
        for p, (n, event) in stored.items()
    }


async def test_all_partitions_are_decided_by_one_probe(settings: Settings) -> None:
    Probe.log = {
        0: (10, {4: "e4"}),  # the record before offset 5 is the one applied: unchanged
        1: (30, {6: "new"}),  # a new log that grew past the stored offset: reset
        2: (3, {}),  # a new log that ends before the stored offset: reset
        # 3: never answers: undecided
    }
    result = await reset_check.logs_match(
        settings, rows(p0=(5, "e4"), p1=(7, "e6"), p2=(9, "e8"), p3=(4, "e3"), p4=(0, "x"))
    )
    assert {tp.partition: ok for tp, ok in result.items()} == {
        0: True,
        1: False,
        2: False,
        3: None,
        4: True,
    }
    assert len(Probe.instances) == 1
    assert Probe.instances[0].stopped


async def test_a_cancelled_error_from_inside_aiokafka_is_a_failed_check(
    settings: Settings,
) -> None:
    Probe.log = {0: (10, {4: "e4"})}
    Probe.fail_with = asyncio.CancelledError()
    result = await reset_check.logs_match(settings, rows(p0=(5, "e4")))
    assert list(result.values()) == [None]
    assert Probe.instances[0].stopped


async def test_cancelling_the_projector_still_cancels_the_check(settings: Settings) -> None:
    Probe.log = {}  # never answers: the check waits until it is cancelled
    task = asyncio.create_task(reset_check.logs_match(settings, rows(p0=(5, "e4"))))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
