"""The relay: publishes the transactional outbox to Kafka, in order, never skipping a row.

One round: renew this relay's shard leases, read the oldest unpublished rows of those shards,
send them grouped by partition (one Kafka batch is appended atomically, and a partition's next
batch is sent only after the previous one was acknowledged), then delete the acknowledged rows.
A failed send leaves its row and every later row of that partition in the outbox; the round is
retried with backoff, starting again from the oldest row. So a payment's events reach Kafka in
version order, and a crash between publish and delete republishes (at-least-once; consumers
dedupe by version) but never loses anything.

The topic is checked (and created, with the configured partition count) before the first send
and again after every failure, before a new producer sends anything: a restarted broker is a
new, empty cluster. A producer whose connection was lost fails its sends rather than resending
them to whatever answers next (``kessai.broker.refuse_produce_after_reconnect``). The producer
never makes the broker auto-create the topic, and nothing is published to a topic whose
partition count differs from the configured one (keys would land on other partitions than
before): the relay logs one error, shows it in ``kessai_relay_topic_mismatch`` and checks
again with backoff.

Run it with ``kessai relay`` or ``python -m command_service.relay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import anyio.to_thread
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy.engine import Engine
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from command_service import outbox
from kessai.broker import BrokerUnavailable, TopicMismatch, ensure_topic, new_producer
from kessai.clock import utcnow
from kessai.events import kafka_headers, kafka_key
from kessai.settings import Settings

log = logging.getLogger(__name__)

PublishedHook = Callable[[Sequence[outbox.OutboxRow]], Awaitable[None]]

TRANSIENT = (KafkaError, BrokerUnavailable, asyncio.TimeoutError, OSError, sa.exc.OperationalError)
PURGE_EVERY_SECONDS = 60.0


class Relay:
    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        owner: str | None = None,
        after_publish: PublishedHook | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``after_publish`` runs after rows were acknowledged and before they are marked:
        the window in which a crash republishes. Tests inject failures there."""
        self.engine = engine
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.after_publish = after_publish
        self.bootstrap = settings.resolved_kafka_bootstrap()
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()
        self._last_purge = 0.0
        self._mismatch = False
        self.topic_mismatch = Gauge(
            "kessai_relay_topic_mismatch",
            "1 while the relay publishes nothing because the topic's partition count differs "
            "from the configured one.",
            registry=registry or CollectorRegistry(),
        )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Publish until ``stop`` is set; transient failures back off and retry forever."""
        stop = stop or asyncio.Event()
        poll = self.settings.relay_poll_interval_ms / 1000
        try:
            while not stop.is_set():
                published = await self._round_with_retries(stop)
                await self._purge_idempotency_keys()
                if published < self.settings.relay_batch_size:
                    await _wait(stop, poll)
        finally:
            await self.close()

    async def _round_with_retries(self, stop: asyncio.Event) -> int:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_random_exponential(
                multiplier=0.05, max=self.settings.relay_retry_max_backoff_ms / 1000
            ),
            before_sleep=self._log_failure,
            reraise=True,
        ):
            with attempt:
                if stop.is_set():
                    return 0
                return await self.run_once()
        return 0  # pragma: no cover - AsyncRetrying either returns or raises

    async def _log_failure(self, retry_state: object) -> None:
        outcome = getattr(retry_state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, TopicMismatch):
            if not self._mismatch:  # one error per episode, not one per retry
                log.error("relay stopped publishing: %s; checking again with backoff", exc)
            self._mismatch = True
            self.topic_mismatch.set(1)
        else:
            log.warning("relay round failed, will retry: %r", exc)
        await self._drop_producer()

    async def run_once(self) -> int:
        """One round; returns how many rows were published and marked."""
        shards = await anyio.to_thread.run_sync(self._claim)
        if not shards:
            return 0
        rows = await anyio.to_thread.run_sync(self._fetch, shards)
        if not rows:
            return 0
        producer = await self._ready_producer()
        acked, error = await self._publish(producer, rows)
        if acked and self.after_publish is not None:
            await self.after_publish(acked)
        if acked:
            await anyio.to_thread.run_sync(self._mark, [r.outbox_id for r in acked])
        if error is not None:
            raise error
        return len(acked)

    async def close(self) -> None:
        await self._drop_producer()
        try:
            await anyio.to_thread.run_sync(self._release)
        except sa.exc.SQLAlchemyError:
            log.warning("could not release relay leases; they lapse by themselves")

    # -- database (runs in worker threads) ---------------------------------------------------

    def _claim(self) -> list[int]:
        with self.engine.begin() as conn:
            return outbox.claim_leases(
                conn,
                owner=self.owner,
                shards=self.settings.outbox_shards,
                now=utcnow(),
                ttl=timedelta(seconds=self.settings.relay_lease_seconds),
            )

    def _fetch(self, shards: list[int]) -> list[outbox.OutboxRow]:
        with self.engine.connect() as conn:
            return outbox.fetch_unpublished(
                conn, shards=shards, limit=self.settings.relay_batch_size
            )

    def _mark(self, outbox_ids: list[int]) -> None:
        with self.engine.begin() as conn:
            outbox.mark_published(conn, outbox_ids)

    def _release(self) -> None:
        with self.engine.begin() as conn:
            outbox.release_leases(conn, owner=self.owner)

    async def _purge_idempotency_keys(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_purge < PURGE_EVERY_SECONDS:
            return
        self._last_purge = loop.time()

        def purge() -> int:
            with self.engine.begin() as conn:
                return outbox.purge_expired_idempotency(conn, utcnow())

        try:
            while await anyio.to_thread.run_sync(purge) > 0:
                pass
        except sa.exc.SQLAlchemyError:
            log.warning("purging expired idempotency keys failed; will try again", exc_info=True)

    # -- Kafka --------------------------------------------------------------------------------

    async def _ready_producer(self) -> AIOKafkaProducer:
        """The live producer; a new one only after the topic was checked (created if missing)
        and found with the configured partition count."""
        if self._producer is None:
            actual = await ensure_topic(
                self.bootstrap,
                self.settings.topic,
                partitions=self.settings.topic_partitions,
                replication_factor=self.settings.topic_replication_factor,
                request_timeout_ms=self.settings.kafka_request_timeout_ms,
            )
            self._check_partition_count(actual)
            producer = new_producer(
                self.bootstrap, request_timeout_ms=self.settings.kafka_request_timeout_ms
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    def _check_partition_count(self, actual: int) -> None:
        configured = self.settings.topic_partitions
        if actual != configured:
            raise TopicMismatch(
                f"topic {self.settings.topic} has {actual} partitions, {configured} configured; "
                "recreate the topic with the configured count (or configure its count)"
            )
        self._mismatch = False
        self.topic_mismatch.set(0)

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), timeout=5)
            except (TimeoutError, KafkaError, OSError):
                log.debug("producer did not stop cleanly", exc_info=True)
                # stop() gave up waiting for batches it still retries; its sender task would
                # go on sending them to whatever broker answers next, next to the new
                # producer's batches. End it and its connections (aiokafka has no public way).
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer._sender.close(), timeout=1)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.client.close(), timeout=1)

    async def _publish(
        self, producer: AIOKafkaProducer, rows: list[outbox.OutboxRow]
    ) -> tuple[list[outbox.OutboxRow], BaseException | None]:
        """Send rows grouped by partition; return the acknowledged rows and the first error.

        Within a partition rows go in outbox order, batch after acknowledged batch, and the
        first failure stops that partition: nothing after it is sent in this round.
        """
        topic = self.settings.topic
        partitions = sorted(await producer.partitions_for(topic))
        if not partitions:
            raise BrokerUnavailable(f"topic {topic} has no partitions")
        # The producer's metadata may have changed since the topic was checked (a restarted
        # broker): never spread keys over another partition count.
        self._check_partition_count(len(partitions))
        by_partition: dict[int, list[outbox.OutboxRow]] = {}
        for row in rows:
            key = kafka_key(row.payment_id)
            partition = self._partitioner(key, partitions, partitions)
            by_partition.setdefault(partition, []).append(row)

        timeout = self.settings.kafka_request_timeout_ms / 1000 * 2

        async def send_partition(
            partition: int, part_rows: list[outbox.OutboxRow]
        ) -> tuple[list[outbox.OutboxRow], BaseException | None]:
            acked: list[outbox.OutboxRow] = []
            pending: list[outbox.OutboxRow] = []
            batch = producer.create_batch()
            try:
                for row in part_rows:
                    args = _record(row)
                    if batch.append(**args) is None:
                        await _send(batch, partition)
                        acked.extend(pending)
                        pending, batch = [], producer.create_batch()
                        if batch.append(**args) is None:
                            raise BrokerUnavailable(f"event {row.event_id} is larger than a batch")
                    pending.append(row)
                if pending:
                    await _send(batch, partition)
                    acked.extend(pending)
            except TRANSIENT as exc:
                return acked, exc
            return acked, None

        async def _send(batch: object, partition: int) -> None:
            # Bounded as a whole: after a broker restart, send_batch itself can wait for
            # metadata of a topic that does not exist (yet) for as long as nothing creates it.
            await asyncio.wait_for(_send_and_ack(batch, partition), timeout=timeout)

        async def _send_and_ack(batch: object, partition: int) -> None:
            future = await producer.send_batch(batch, topic, partition=partition)
            await future

        results = await asyncio.gather(
            *(send_partition(p, part_rows) for p, part_rows in by_partition.items())
        )
        acked_rows = [row for acked, _ in results for row in acked]
        acked_rows.sort(key=lambda r: r.outbox_id)
        errors = [err for _, err in results if err is not None]
        return acked_rows, (errors[0] if errors else None)


def _record(row: outbox.OutboxRow) -> dict[str, object]:
    return {
        "key": kafka_key(row.payment_id),
        "value": row.body.encode(),
        "timestamp": None,
        "headers": kafka_headers(row.event_type, row.schema_version, row.event_id),
    }


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def serve(settings: Settings) -> None:
    """Run a relay until SIGINT/SIGTERM."""
    from kessai.db import create_db_engine
    from kessai.observability import serve_metrics
    from kessai.runtime import freeze_startup_heap, stop_on_signals

    engine = create_db_engine(settings.resolved_write_db_url(), pool_size=4)
    freeze_startup_heap()
    registry = CollectorRegistry()
    if settings.relay_metrics_port is not None:
        serve_metrics(settings, settings.relay_metrics_port, registry)
    stop = stop_on_signals()
    try:
        log.info(
            "relay publishing to %s topic %s", settings.resolved_kafka_bootstrap(), settings.topic
        )
        await Relay(engine=engine, settings=settings, registry=registry).run(stop)
    finally:
        engine.dispose()


def main() -> None:
    from kessai.runtime import configure_logging

    configure_logging()
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
