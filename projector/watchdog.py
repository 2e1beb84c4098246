"""The projector's once-a-second look at its partitions, between batches.

It sets the lag gauge, finds partitions that stopped moving while their log holds records past
them (or whose position is beyond the log's end: a reset log), and partitions at the end of
their log, whose caught-up time the caller stores. It reads the consumer only; seeking and
storing are the caller's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Gauge

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
STALL_SECONDS = 15.0
"""A partition whose position has not moved for this long while the log holds records past
it (or that never got a fetch answer) is sought again."""
BUSY_STALL_SECONDS = 60.0
"""The same while batches of other partitions are being applied: a consumer behind its log
serves partitions by turns (aiokafka drains one prefetched partition buffer after another), so
a partition may wait its turn for more than ``STALL_SECONDS`` (seen at 100,000 preloaded
events); seeking it would throw its buffer away and send it to the back of the queue."""


@dataclass
class Findings:
    stalled: list[TopicPartition] = field(default_factory=list)
    """Partitions to seek again to their stored offsets."""
    at_end: list[int] = field(default_factory=list)
    """Partitions at the end of their log, at the position the projector expects."""


class Watchdog:
    def __init__(self, lag: Gauge) -> None:
        self._lag = lag
        self._last_look = 0.0
        # Per partition: the position last seen and since when.
        self._progress: dict[int, tuple[int | None, float]] = {}

    def forget(self, partition: int) -> None:
        self._progress.pop(partition, None)

    async def look(
        self, consumer: AIOKafkaConsumer, expected: dict[int, int | None], last_applied: float
    ) -> Findings | None:
        """What needs doing, at most once every ``IDLE_CHECK_SECONDS`` (else ``None``).
        ``expected`` holds the partitions the projector has sought; ``last_applied`` is the
        monotonic time of the last batch that applied events."""
        now = time.monotonic()
        if now - self._last_look < IDLE_CHECK_SECONDS:
            return None
        self._last_look = now
        busy = now - last_applied < STALL_SECONDS
        stall_after = BUSY_STALL_SECONDS if busy else STALL_SECONDS
        findings = Findings()
        for tp in [tp for tp in consumer.assignment() if tp.partition in expected]:
            await self._look_at(consumer, tp, expected, now, stall_after, findings)
        return findings

    async def _look_at(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        expected: dict[int, int | None],
        now: float,
        stall_after: float,
        findings: Findings,
    ) -> None:
        # The high watermark of the last fetch response; not end_offsets(), which the embedded
        # broker answers with the last record batch's base offset + 1.
        end = consumer.highwater(tp)
        position = None if end is None else await consumer.position(tp)
        seen, since = self._progress.setdefault(tp.partition, (position, now))
        if seen != position or (end is not None and position == end):
            self._progress[tp.partition] = (position, now)
        elif now - since > stall_after:
            log.warning(
                "partition %d: no progress for %.0f s at position %s (log end %s); "
                "seeking it again",
                tp.partition,
                now - since,
                position,
                end,
            )
            self._progress[tp.partition] = (position, now)
            findings.stalled.append(tp)
        if end is None or position is None:
            return
        self._lag.labels(str(tp.partition)).set(max(end - position, 0))
        if position > end:
            log.warning("partition %d: position beyond the log end: reset?", tp.partition)
            findings.stalled.append(tp)
        elif position == end and expected.get(tp.partition) == position:
            findings.at_end.append(tp.partition)
