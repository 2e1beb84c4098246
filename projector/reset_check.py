"""The projector's log-reset check: does the log still hold the event last applied?

The embedded broker forgets everything on restart and never answers OffsetOutOfRange, so a
stored offset may point past the end of a new, shorter log, or into a new log that already grew
past it. On assignment, and whenever the consumer's connection to the broker was lost, the
projector asks ``logs_match`` about all its partitions at once: the record just before each
stored offset must be the event it last applied (by event id); if not, or if the log ends
before the stored offset, the log was reset and the partition starts again from the beginning
(re-applied events are duplicates and change nothing).

No database work here: the caller reads the stored offsets and stores the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from kessai import offsets
from kessai.broker import refuse_auto_creation
from kessai.settings import Settings

log = logging.getLogger(__name__)

PROBE_SECONDS = 3.0
"""How long the reset check waits for the records before the stored offsets (all partitions at
once); a partition it gets no answer for is checked again a second later."""


class ProbeFailed(RuntimeError):
    """The reset check could not read the log (the broker is away, or aiokafka gave up)."""


async def logs_match(
    settings: Settings, rows: dict[TopicPartition, offsets.OffsetRow]
) -> dict[TopicPartition, bool | None]:
    """Per partition, whether the log still holds, just before the stored offset, the event
    last applied (``None``: no answer within ``PROBE_SECONDS``).

    All partitions are read at once by one consumer. Asked of the record itself, or of the
    high watermark of a fetch (a log that ends before the stored offset was reset), never
    of ListOffsets: the embedded broker answers ListOffsets(latest) with the base offset of
    the last record batch plus one, not with the end of the log.
    """
    result: dict[TopicPartition, bool | None] = {
        tp: True for tp, row in rows.items() if row.next_offset == 0
    }
    todo = {tp: row for tp, row in rows.items() if row.next_offset > 0}
    if not todo:
        return result
    try:
        result.update(await _probe(settings, todo))
    except ProbeFailed as exc:
        log.warning("the reset check failed: %s", exc)
    return {tp: result.get(tp) for tp in rows}


async def _probe(
    settings: Settings, todo: dict[TopicPartition, offsets.OffsetRow]
) -> dict[TopicPartition, bool]:
    decided: dict[TopicPartition, bool] = {}
    probe = AIOKafkaConsumer(
        bootstrap_servers=settings.resolved_kafka_bootstrap(),
        enable_auto_commit=False,
        request_timeout_ms=max(settings.kafka_request_timeout_ms, 4_000),
        fetch_max_wait_ms=100,
    )
    refuse_auto_creation(probe._client)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_SECONDS
    try:
        await asyncio.wait_for(probe.start(), PROBE_SECONDS)
        probe.assign(list(todo))
        for tp, row in todo.items():
            probe.seek(tp, row.next_offset - 1)
        while len(decided) < len(todo) and loop.time() < deadline:
            pending = [tp for tp in todo if tp not in decided]
            fetched = await probe.getmany(*pending, timeout_ms=100, max_records=len(pending))
            for tp in pending:
                verdict = _verdict(fetched.get(tp), probe.highwater(tp), todo[tp])
                if verdict is not None:
                    decided[tp] = verdict
                    probe.pause(tp)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # A future of aiokafka's cancelled under the probe (its connection went away):
        # not a reason for the projector to stop.
        raise ProbeFailed("aiokafka cancelled the probe") from exc
    except (KafkaError, OSError, TimeoutError) as exc:
        raise ProbeFailed(repr(exc)) from exc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.wait_for(probe.stop(), 5))
    return decided


def _verdict(
    records: list[ConsumerRecord[bytes, bytes]] | None, end: int | None, row: offsets.OffsetRow
) -> bool | None:
    """One partition's answer from one fetch: ``None`` while it says nothing yet."""
    if records:
        return _is_last_applied(records[0], row)
    if end is not None and end < row.next_offset:
        return False  # the log ends before the stored offset
    return None


def _is_last_applied(record: ConsumerRecord[bytes, bytes], row: offsets.OffsetRow) -> bool:
    if record.offset != row.next_offset - 1:
        return False
    if row.last_event_id is None:
        return True
    event_id = dict(record.headers).get("event_id", b"").decode()
    return bool(event_id == row.last_event_id)
