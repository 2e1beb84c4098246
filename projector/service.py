"""The projector's batch loop: Kafka in, one read-DB transaction per consumed batch.

Exactly-once effect without Kafka transactions: a batch's effects and the offsets after it are
committed in one read-DB transaction, and on partition assignment the consumer seeks to the
stored offsets (Kafka's committed offsets are written afterwards, for monitoring only).

Fencing: each batch transaction first locks its partitions' offset rows and checks they still
hold the positions this consumer started from. A consumer that lost a partition in a rebalance
and still holds a batch for it finds the row moved on and rolls back: it cannot apply or commit
stale work.

Log resets (``projector.reset_check``): on assignment, and whenever the consumer's connection to
the broker was lost (nothing fetched after that is applied first), the stored offsets are
checked against the log, and a reset log is read again from its beginning. Between batches, a
watchdog (``projector.watchdog``) finds partitions that stopped moving. The projector's
consumers never make the broker auto-create the topic; if the topic is missing (a restarted
broker nobody re-created it on), the projector creates it.

Transactions: one per batch (``_apply_in_transaction``); the short ones on offset rows outside
batches are in ``projector.stored_offsets``.

Run it with ``kessai projector`` or ``python -m projector``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio.to_thread
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from kessai import offsets
from kessai.broker import BrokerUnavailable, ensure_topic, new_consumer
from kessai.clock import utcnow
from kessai.settings import Settings
from projector import repository, reset_check, stored_offsets
from projector.apply import DecodedBatch, Record, apply_batch, decode_batch
from projector.metrics import BatchResult, ProjectorMetrics
from projector.watchdog import Watchdog

log = logging.getLogger(__name__)


class StaleAssignment(RuntimeError):
    """The stored offsets moved on under this consumer: another one owns the partition now."""


class Projector:
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
        self.metrics = ProjectorMetrics(registry or CollectorRegistry())
        self.watchdog = Watchdog(self.metrics.lag)
        # Per assigned partition: the stored next_offset this consumer expects to find
        # (None: no row yet). Only the event loop touches it.
        self.expected: dict[int, int | None] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._zones: dict[str, ZoneInfo] = {}
        self._last_applied = -math.inf  # monotonic time of the last batch that applied (or skipped)
        self._seek_lock = asyncio.Lock()
        # Assigned partitions to seek to their stored offsets before anything else is applied
        # (a seek failed in the rebalance listener, or a batch of theirs was refused).
        self._unsought: set[TopicPartition] = set()
        # Seeks so far: records fetched before a seek are never applied after it.
        self._seeks = 0
        # The consumer's broker connections at the last look: one closed since means the
        # broker may have been restarted (a new, empty log) under the consumer's positions.
        self._connections: list[Any] = []
        self._last_topic_check = 0.0

    # -- the loop ------------------------------------------------------------------------------

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
            group_id=self.settings.projector_group_id,
            batch_size=self.settings.projector_batch_size,
            request_timeout_ms=self.settings.kafka_request_timeout_ms,
        )
        consumer.subscribe([self.topic], listener=_Listener(self))
        self._consumer = consumer
        await consumer.start()
        # One batch is in the database while the loop fetches and decodes the next: those use
        # the event loop's thread while the batch's thread mostly waits for the database.
        # Batches still reach the database one after the other, in offset order; the idle
        # checks (which may seek) run only between them.
        applying: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                seeks = self._seeks
                batch = await consumer.getmany(
                    timeout_ms=200, max_records=self.settings.projector_batch_size
                )
                records = [
                    _record(r) for tp in sorted(batch, key=lambda t: t.partition) for r in batch[tp]
                ]
                decoded = decode_batch(records) if records else None
                if applying is not None:
                    await applying
                    applying = None
                if self._connection_lost(consumer):
                    # What was fetched since may come from a new, empty log: check every
                    # partition against its stored event before applying anything more.
                    log.warning("the connection to the broker was lost; checking for a log reset")
                    self._unsought.update(consumer.assignment())
                await self._check_topic(consumer)
                if not self._unsought:
                    await self._idle_checks()
                if self._unsought or self._seeks != seeks:
                    # Records fetched around a seek, or while partitions wait for one, may start
                    # at the wrong offset, and the consumer's position has already moved past
                    # them: never apply them, never drop them without seeking their partitions
                    # back to the stored offsets (that would skip them).
                    self._drop(records)
                    await self._retry_unsought(consumer)
                    continue
                if decoded is not None:
                    applying = asyncio.create_task(self._apply(decoded))
        finally:
            if applying is not None:
                # Let the batch in flight commit (or roll back) before the consumer leaves.
                with contextlib.suppress(Exception):
                    await asyncio.shield(applying)
            self._consumer = None
            with contextlib.suppress(KafkaError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(consumer.stop(), timeout=10)

    async def _apply(self, batch: DecodedBatch) -> None:
        consumer = self._consumer
        assert consumer is not None
        records = batch.records
        partitions = {r.partition for r in records}
        if any(p not in self.expected for p in partitions):
            # Revoked while the batch was fetched: the new owner applies what is its own; the
            # partitions still ours are sought back so that nothing fetched here is skipped.
            self._drop(records)
            return
        expected = {p: self.expected[p] for p in partitions}
        caught_up = {
            p
            for p in partitions
            if consumer.highwater(TopicPartition(self.topic, p)) == _last_offset(records, p) + 1
        }
        started = time.perf_counter()
        try:
            result = await anyio.to_thread.run_sync(
                self._apply_in_transaction, batch, expected, caught_up
            )
        except StaleAssignment:
            log.warning(
                "partitions %s moved on under this consumer; re-seeking", sorted(partitions)
            )
            self._unsought.update(TopicPartition(self.topic, p) for p in partitions)
            return
        except sa.exc.OperationalError:
            # The read DB is unreachable or deadlocked: nothing was applied. Re-read the batch.
            log.warning("read DB failed; the batch will be fetched again", exc_info=True)
            self._unsought.update(TopicPartition(self.topic, p) for p in partitions)
            await asyncio.sleep(0.5)
            return
        self.metrics.count(result, time.perf_counter() - started)
        if result.applied or result.skipped:
            self._last_applied = time.monotonic()
        kafka_offsets = {}
        for p in partitions:
            next_offset = _last_offset(records, p) + 1
            self.expected[p] = next_offset
            kafka_offsets[TopicPartition(self.topic, p)] = OffsetAndMetadata(next_offset, "")
        try:
            await consumer.commit(kafka_offsets)
        except (CommitFailedError, KafkaError):
            # The read DB holds the truth; Kafka's copy is for monitoring tools only.
            log.info("committing offsets to Kafka failed (rebalance?); the read DB has them")

    def _drop(self, records: list[Record]) -> None:
        """Fetched records that will not be applied: their partitions are sought again (to the
        stored offsets) before anything else of theirs is applied."""
        self._unsought.update(TopicPartition(self.topic, p) for p in {r.partition for r in records})

    def _apply_in_transaction(
        self, batch: DecodedBatch, expected: dict[int, int | None], caught_up: set[int]
    ) -> BatchResult:
        """The batch's one read-DB transaction: it begins and commits here, and nowhere else
        are a batch's effects written. Fenced by the offset rows (``StaleAssignment``)."""
        now = utcnow()
        with self.engine.begin() as conn:
            stored = offsets.lock_offsets(conn, self.topic, expected)
            for p, position in expected.items():
                row = stored.get(p)
                if (row.next_offset if row is not None else None) != position:
                    raise StaleAssignment(p)
            snapshot = repository.load_snapshot(conn, batch.stream_ids)
            changes = apply_batch(batch, snapshot, lambda m: self._zone(conn, m))
            repository.write_changes(conn, changes, snapshot, now)
            new_offsets = stored_offsets.offsets_after(batch, stored, changes, caught_up, now)
            offsets.save_offsets(conn, self.topic, new_offsets, now)
        return BatchResult(
            applied=changes.applied,
            duplicates=changes.duplicates,
            skipped=changes.skipped,
            parked=len(changes.parked),
            dead_letters=len(changes.dead_letters),
        )

    def _zone(self, conn: sa.Connection, merchant_id: str) -> ZoneInfo:
        zone = self._zones.get(merchant_id)
        if zone is None:
            name = repository.merchant_time_zone(conn, merchant_id)
            try:
                zone = ZoneInfo(name or self.settings.default_merchant_time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                log.error("merchant %s has an unknown time zone %r", merchant_id, name)
                zone = ZoneInfo(self.settings.default_merchant_time_zone)
            self._zones[merchant_id] = zone
        return zone

    # -- assignment, resets, freshness ---------------------------------------------------------

    async def on_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        mine = [tp for tp in assigned if tp.topic == self.topic]
        log.info("assigned partitions %s", sorted(tp.partition for tp in mine))
        if not mine:
            return
        try:
            await self._seek_to_stored(mine)
            log.info("assigned partitions sought to their stored offsets")
        except asyncio.CancelledError:
            # aiokafka cancels the listener when the group moves on (a new rebalance, a stop).
            self._leave_unsought(mine)
            raise
        except Exception:
            # Never let the listener fail: aiokafka would keep the assignment unsought. The
            # batch loop seeks these partitions before it applies anything of theirs.
            log.exception("seeking assigned partitions failed; will retry from the loop")
            self._leave_unsought(mine)

    def _leave_unsought(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self.expected.pop(tp.partition, None)
        self._unsought.update(tps)

    def on_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("revoked partitions %s", sorted(tp.partition for tp in revoked))
        for tp in revoked:
            self.watchdog.forget(tp.partition)
            self.expected.pop(tp.partition, None)

    async def _retry_unsought(self, consumer: AIOKafkaConsumer) -> None:
        self._unsought &= consumer.assignment()
        if not self._unsought:
            return
        try:
            await self._seek_to_stored(list(self._unsought))
        except Exception:
            log.exception("seeking assigned partitions failed again; retrying in a second")
            await asyncio.sleep(1)

    async def _seek_to_stored(self, tps: Sequence[TopicPartition]) -> None:
        # The rebalance listener and the loop's reset check may both get here at once.
        async with self._seek_lock:
            undecided = await self._seek_to_stored_locked(tps)
            self._unsought.difference_update(tps)
            if undecided:
                log.warning(
                    "partitions %s: the reset check got no answer; checking again",
                    sorted(tp.partition for tp in undecided),
                )
                self._leave_unsought(undecided)

    async def _seek_to_stored_locked(self, tps: Sequence[TopicPartition]) -> list[TopicPartition]:
        """Seek each partition to its stored offset, or to the beginning of a reset log;
        returns the partitions the reset check could not decide (left where they are)."""
        consumer = self._consumer
        assert consumer is not None
        stored = await anyio.to_thread.run_sync(
            stored_offsets.read, self.engine, self.topic, [tp.partition for tp in tps]
        )
        begins = await consumer.beginning_offsets(list(tps))
        matches = await reset_check.logs_match(
            self.settings, {tp: stored[tp.partition] for tp in tps if tp.partition in stored}
        )
        undecided = []
        for tp in tps:
            row = stored.get(tp.partition)
            position: int
            if row is None:
                position = begins[tp]
                self.expected[tp.partition] = None
            elif matches.get(tp) is None:
                undecided.append(tp)
                continue
            elif not matches[tp]:
                log.warning(
                    "partition %d: the record before stored offset %d is not the event last "
                    "applied: the log was reset; starting again from its beginning",
                    tp.partition,
                    row.next_offset,
                )
                self.metrics.log_resets.inc()
                position = await anyio.to_thread.run_sync(
                    stored_offsets.rewind, self.engine, self.topic, tp.partition, row, begins[tp]
                )
                self.expected[tp.partition] = position
            else:
                position = row.next_offset
                self.expected[tp.partition] = position
            consumer.seek(tp, position)
            self._seeks += 1
        return undecided

    async def _idle_checks(self) -> None:
        """Once a second: lag metrics, stalled or reset partitions, and the caught-up stamp."""
        consumer = self._consumer
        if consumer is None:
            return
        findings = await self.watchdog.look(consumer, self.expected, self._last_applied)
        if findings is None:
            return
        if findings.stalled:
            try:
                await self._seek_to_stored(findings.stalled)
            except Exception:
                log.exception("seeking partitions failed; will retry from the loop")
                self._leave_unsought(findings.stalled)
        if findings.at_end:
            positions = {p: self.expected.get(p) for p in findings.at_end}
            await anyio.to_thread.run_sync(
                stored_offsets.stamp_caught_up, self.engine, self.topic, positions
            )

    def _connection_lost(self, consumer: AIOKafkaConsumer) -> bool:
        """Whether a broker connection of the consumer closed since the last call. aiokafka
        reconnects by itself and says nothing; a restarted broker is a new, empty log. (Uses
        aiokafka's connection table: it has no public hook for this.)"""
        lost = any(not conn.connected() for conn in self._connections)
        self._connections = [
            conn for conn in getattr(consumer._client, "_conns", {}).values() if conn.connected()
        ]
        return lost

    async def _check_topic(self, consumer: AIOKafkaConsumer) -> None:
        """Once a second while the consumer knows no partition of the topic, or partitions wait
        for their reset check (a restarted broker that nobody re-created the topic on): create
        it if missing, with the configured count, and ask for new metadata at once. The
        projector's consumers never let the broker auto-create it."""
        now = time.monotonic()
        known = consumer.partitions_for_topic(self.topic)
        if (known and not self._unsought) or now - self._last_topic_check < 1.0:
            return
        self._last_topic_check = now
        try:
            actual = await ensure_topic(
                self.settings.resolved_kafka_bootstrap(),
                self.topic,
                partitions=self.settings.topic_partitions,
                replication_factor=self.settings.topic_replication_factor,
                request_timeout_ms=self.settings.kafka_request_timeout_ms,
            )
        except BrokerUnavailable as exc:
            log.warning("topic %s unknown and the broker unreachable: %s", self.topic, exc)
            return
        if actual != self.settings.topic_partitions:
            log.error(
                "topic %s has %d partitions, %d configured",
                self.topic,
                actual,
                self.settings.topic_partitions,
            )
        consumer._client.force_metadata_update()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, projector: Projector) -> None:
        self.projector = projector

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.projector.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.projector.on_assigned(assigned)


def _record(r: ConsumerRecord[bytes, bytes]) -> Record:
    return Record(
        topic=r.topic,
        partition=r.partition,
        offset=r.offset,
        key=r.key,
        value=r.value,
        headers=tuple((k, bytes(v)) for k, v in r.headers),
    )


def _last_offset(records: list[Record], partition: int) -> int:
    return max(r.offset for r in records if r.partition == partition)


async def serve(settings: Settings) -> None:
    from kessai.db import create_db_engine
    from kessai.observability import serve_metrics
    from kessai.runtime import freeze_startup_heap, stop_on_signals

    engine = create_db_engine(settings.resolved_read_db_url(), pool_size=4)
    freeze_startup_heap()
    registry = CollectorRegistry()
    if settings.projector_metrics_port is not None:
        serve_metrics(settings, settings.projector_metrics_port, registry)
    stop = stop_on_signals()
    try:
        log.info(
            "projector consuming %s from %s", settings.topic, settings.resolved_kafka_bootstrap()
        )
        await Projector(engine=engine, settings=settings, registry=registry).run(stop)
    finally:
        engine.dispose()


def main() -> None:
    from kessai.runtime import configure_logging

    configure_logging()
    asyncio.run(serve(Settings()))
