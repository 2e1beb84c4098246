"""Test helpers: request bodies, reading the write store and the topic back."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy.engine import Engine

from kessai.schema.write import events, idempotency_keys, outbox

_keys = itertools.count()


def new_key(prefix: str = "key") -> str:
    return f"{prefix}-{uuid.uuid4().hex}-{next(_keys)}"


def payment_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "merchant_id": "merchant-1",
        "user_id": "user-1",
        "amount": 1000,
        "currency": "JPY",
        "method": "balance",
    }
    body.update(overrides)
    return body


def count_rows(engine: Engine) -> dict[str, int]:
    """How many rows each write-store table holds."""
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (events, outbox, idempotency_keys)
        }


def stored_events(engine: Engine) -> list[tuple[uuid.UUID, int]]:
    """(payment_id, version) of every event in the write store."""
    with engine.connect() as conn:
        return [
            (row.payment_id, row.version)
            for row in conn.execute(sa.select(events.c.payment_id, events.c.version))
        ]


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    at_least: int,
    within: float = 30.0,
    settle: float = 0.5,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read the topic from the beginning until ``at_least`` records arrived (then ``settle``
    seconds more, to catch extra copies) or ``within`` seconds.
    Assigns partitions directly: no consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = asyncio.get_running_loop().time() + within
        while not partitions:
            await consumer.topics()  # refreshes metadata
            partitions = consumer.partitions_for_topic(topic)
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"topic {topic} never appeared")
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        settle_until: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for part in batch.values():
                records.extend(part)
            now = loop.time()
            if len(records) >= at_least and settle_until is None:
                settle_until = now + settle
            if (settle_until is not None and now >= settle_until) or now > deadline:
                return records
    finally:
        await consumer.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 30.0, interval: float = 0.05
) -> None:
    """Wait until ``check()`` is true; fail the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)
