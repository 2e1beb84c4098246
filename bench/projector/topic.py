"""The projector bench's topic: created as every kessai component does, filled as the relay
fills it."""

from __future__ import annotations

import asyncio

from rich.progress import Progress

from bench.projector.dataset import Header
from kessai.broker import ensure_topic, new_producer

# -- the broker --------------------------------------------------------------------------------


async def create_topic(bootstrap: str, topic: str, partitions: int) -> int:
    actual = await ensure_topic(bootstrap, topic, partitions=partitions)
    if actual != partitions:
        raise RuntimeError(f"topic {topic} has {actual} partitions, not {partitions}")
    return actual


async def publish(
    bootstrap: str,
    topic: str,
    records: list[list[tuple[bytes, bytes, list[Header]]]],
    progress: Progress,
) -> None:
    """Every partition's records in order, as record batches sent without waiting for each
    other's acknowledgement (aiokafka keeps one batch per partition queued behind the one in
    flight, so a partition's batches stay in order); then wait for every acknowledgement."""
    producer = new_producer(bootstrap)
    await producer.start()
    task = progress.add_task("publishing", total=sum(map(len, records)))
    try:
        known = sorted(await producer.partitions_for(topic))
        if known != list(range(len(records))):
            raise RuntimeError(f"topic {topic} has partitions {known}")

        async def one(partition: int, mine: list[tuple[bytes, bytes, list[Header]]]) -> None:
            acks: list[asyncio.Future[object]] = []
            batch = producer.create_batch()
            count = 0
            for key, value, headers in mine:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
                    progress.advance(task, count)
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        raise RuntimeError("a record larger than a batch")
                count += 1
            if count:
                acks.append(await producer.send_batch(batch, topic, partition=partition))
                progress.advance(task, count)
            await asyncio.gather(*acks)

        await asyncio.gather(*(one(p, mine) for p, mine in enumerate(records)))
    finally:
        progress.remove_task(task)
        await producer.stop()
