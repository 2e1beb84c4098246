"""Re-publishing a payment's whole history from the write store.

Every event of each payment goes out again in version order, key = payment_id, with the usual
headers plus ``replay=1``, ``acks=all``. The projector repairs through its normal path: versions
it has are duplicates, a missing version fills its gap (and drains what was parked behind it),
and a valid event at a dead-lettered version supersedes the dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from kessai.broker import ensure_topic, new_producer
from kessai.events import kafka_headers, kafka_key
from kessai.settings import Settings
from reconciler.loaders import EventRow

Send = Callable[[Sequence[EventRow]], Awaitable[int]]


@contextlib.asynccontextmanager
async def republisher(settings: Settings) -> AsyncIterator[Send]:
    """A connected producer (the topic created first), as a function that sends rows.

    Connecting before anything else is changed lets a repair stop, with the read side
    untouched, when the broker cannot be reached.
    """
    bootstrap = settings.resolved_kafka_bootstrap()
    await ensure_topic(
        bootstrap,
        settings.topic,
        partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication_factor,
        request_timeout_ms=settings.kafka_request_timeout_ms,
    )
    producer = new_producer(bootstrap, request_timeout_ms=settings.kafka_request_timeout_ms)
    try:
        await producer.start()

        async def send(rows: Sequence[EventRow]) -> int:
            """Send ``rows`` (payment_id, version order); return how many were acknowledged.

            A payment's events share a partition (same key) and aiokafka keeps one batch in
            flight per partition, so they arrive in the order sent; even if they did not, the
            projector parks a version that arrives before its predecessor.
            """
            futures = [
                await producer.send(
                    settings.topic,
                    body.encode(),
                    key=kafka_key(payment_id),
                    headers=kafka_headers(event_type, schema_version, event_id, replay=True),
                )
                for payment_id, _version, event_id, event_type, schema_version, body in rows
            ]
            timeout = settings.kafka_request_timeout_ms / 1000 * 3
            await asyncio.wait_for(asyncio.gather(*futures), timeout=timeout)
            return len(futures)

        yield send
    finally:
        await producer.stop()
