"""The rewards service's loop: the payments topic in, one write-store transaction per consumed
batch (``rewards.store.commit_grants``), then the batch's offsets committed to Kafka.

Its own consumer group (``KESSAI_REWARDS_GROUP_ID``, ``kessai-rewards``) reads every stream on
the topic and keeps ``PaymentCaptured`` (the cashback of each campaign), ``UserRegistered``
(the welcome bonus), ``PaymentRefunded`` (the cashback taken back) and the wallet's credits,
``TopUpReceived``, ``WalletCredited`` and ``RewardGranted`` (what pays off a user's debts to
campaigns); the rest (payments' wallet debits, its own take-backs coming back) is skipped by
the ``event_type`` header, without decoding. A record of a kind it acts on that does not
decode is skipped and counted: the projector dead-letters it.

Delivery is at least once and the effect exactly once: the offsets are committed after the
grants are, so a process killed in between, a rebalance or a second instance hands a batch to
a consumer again, and the grants' keys skip what was granted. A failed transaction (the write
store unreachable, more lost races than ``KESSAI_REWARDS_ATTEMPTS``) commits nothing; the
batch's partitions are sought back to where it began and fetched again.

A broker restarted empty (the embedded one keeps nothing) forgets the group's committed offsets
with its log, so the consumer, joining the new cluster's group, starts again from the new log's
beginning (``auto_offset_reset="earliest"``): nothing published after the restart is skipped.
What it fetched from the new log at its old positions before it rejoined is read again, and
skipped by its keys. (The projector, whose offsets live in the read database, must check for a
reset log itself; this service needs no such check.)

Run it with ``kessai rewards`` or ``python -m rewards``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio.to_thread
import pydantic
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from kessai.broker import ensure_topic, new_consumer
from kessai.events import (
    PaymentCaptured,
    PaymentRefunded,
    RewardGranted,
    TopUpReceived,
    UserRegistered,
    WalletCredited,
    parse_any_event,
)
from kessai.grants import payment_facts
from kessai.settings import Settings
from rewards.decide import BatchDecision, Captured, Credited, Fact, Refunded, Registered
from rewards.metrics import RewardsMetrics
from rewards.store import commit_grants

log = logging.getLogger(__name__)

TAKEN = frozenset(
    {
        b"PaymentCaptured",
        b"UserRegistered",
        b"PaymentRefunded",
        b"TopUpReceived",
        b"WalletCredited",
        b"RewardGranted",
    }
)
"""The ``event_type`` headers of the events the rewards service acts on: a payment or a
registration may earn a grant, a refund takes cashback back, and money into a wallet pays off
what its user owes campaigns."""

Records = Sequence[ConsumerRecord[bytes, bytes]]


def fact_of(event: Any) -> Fact | None:
    """What a decoded event means to the rewards (``None``: nothing)."""
    if isinstance(event, PaymentCaptured):
        return Captured(payment_facts(event), recorded_at=event.recorded_at)
    if isinstance(event, UserRegistered):
        return Registered(event.user_id, event.occurred_at, event.recorded_at)
    if isinstance(event, PaymentRefunded):
        p = event.payload
        return Refunded(event.payment_id, p.refund_id, p.refunded_amount, event.recorded_at)
    if isinstance(event, TopUpReceived | WalletCredited | RewardGranted):
        return Credited(event.user_id, event.recorded_at)
    return None


def facts_of(records: Iterable[ConsumerRecord[bytes, bytes]]) -> tuple[list[Fact], int]:
    """The facts of ``records`` (in their order) and how many records of a granting kind did
    not decode. A record without an ``event_type`` header is decoded to find out its kind."""
    facts: list[Fact] = []
    undecodable = 0
    for record in records:
        event_type = next((bytes(v) for k, v in record.headers if k == "event_type"), None)
        if event_type is not None and event_type not in TAKEN:
            continue
        try:
            event = parse_any_event(record.value or b"")
        except (pydantic.ValidationError, ValueError):
            undecodable += event_type is not None
            continue
        fact = fact_of(event)
        if fact is not None:
            facts.append(fact)
    return facts, undecodable


class Assignments(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts the consumer's assignments: a batch fetched under one assignment must not have
    its offsets committed, nor its partitions sought back, under another."""

    def __init__(self) -> None:
        self.epoch = 0

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.epoch += 1

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.epoch += 1


class Rewards:
    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.topic = settings.topic
        self.metrics = RewardsMetrics(registry or CollectorRegistry())
        self.assignments = Assignments()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        bootstrap = self.settings.resolved_kafka_bootstrap()
        await ensure_topic(
            bootstrap,
            self.topic,
            partitions=self.settings.topic_partitions,
            replication_factor=self.settings.topic_replication_factor,
        )
        consumer = new_consumer(
            bootstrap,
            group_id=self.settings.rewards_group_id,
            batch_size=self.settings.rewards_batch_size,
            request_timeout_ms=self.settings.kafka_request_timeout_ms,
        )
        consumer.subscribe([self.topic], listener=self.assignments)
        await consumer.start()
        try:
            while not stop.is_set():
                epoch = self.assignments.epoch
                fetched = await consumer.getmany(
                    timeout_ms=200, max_records=self.settings.rewards_batch_size
                )
                if fetched:
                    await self._grant(consumer, fetched, epoch)
        finally:
            with contextlib.suppress(KafkaError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(consumer.stop(), timeout=10)

    async def _grant(
        self, consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, list[Any]], epoch: int
    ) -> None:
        """Grant a fetched batch, then commit its offsets, unless the group was rebalanced
        since the fetch (``epoch``): after a broker restarted empty the batch's offsets are
        positions in the old log, and committed in the new one they would make whoever is
        assigned the partition next skip the new log's records below them. Not committing
        only hands the batch to a consumer again, where the keys skip it."""
        records = [r for tp in sorted(fetched, key=lambda t: t.partition) for r in fetched[tp]]
        facts, undecodable = facts_of(records)
        self.metrics.undecodable.inc(undecodable)
        if facts:
            started = time.perf_counter()
            try:
                decision = await anyio.to_thread.run_sync(self._commit, facts)
            except sa.exc.SQLAlchemyError:
                log.warning("the grant transaction failed; fetching the batch again", exc_info=True)
                self.metrics.failed.inc()
                if self.assignments.epoch == epoch:
                    _seek_back(consumer, fetched)
                await asyncio.sleep(0.5)
                return
            self.metrics.count(decision, time.perf_counter() - started)
        if self.assignments.epoch != epoch:
            log.info("the group was rebalanced during the batch; its offsets are not committed")
            return
        offsets = {tp: OffsetAndMetadata(batch[-1].offset + 1, "") for tp, batch in fetched.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError):
            # The grants are committed; whoever reads the batch again finds their keys.
            log.info("committing offsets to Kafka failed (rebalance?); the batch may come again")

    def _commit(self, facts: list[Fact]) -> BatchDecision:
        return commit_grants(
            self.engine,
            facts,
            shards=self.settings.outbox_shards,
            attempts=self.settings.rewards_attempts,
            on_retry=self.metrics.retries.inc,
        )


def _seek_back(consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, list[Any]]) -> None:
    """Fetch these records again: each partition still assigned back to its first one."""
    assigned = consumer.assignment()
    for tp, batch in fetched.items():
        if tp in assigned and batch:
            consumer.seek(tp, batch[0].offset)


async def serve(settings: Settings) -> None:
    from kessai.db import create_db_engine
    from kessai.observability import serve_metrics
    from kessai.runtime import freeze_startup_heap, stop_on_signals

    engine = create_db_engine(settings.resolved_write_db_url(), pool_size=2)
    freeze_startup_heap()
    registry = CollectorRegistry()
    if settings.rewards_metrics_port is not None:
        serve_metrics(settings, settings.rewards_metrics_port, registry)
    stop = stop_on_signals()
    try:
        log.info(
            "rewards consuming %s from %s into the write store",
            settings.topic,
            settings.resolved_kafka_bootstrap(),
        )
        await Rewards(engine=engine, settings=settings, registry=registry).run(stop)
    finally:
        engine.dispose()


def main() -> None:
    from kessai.runtime import configure_logging

    configure_logging()
    asyncio.run(serve(Settings()))
