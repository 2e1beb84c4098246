"""The projector's batch loop: Kafka in, one read-DB transaction per consumed batch.

Exactly-once effect without Kafka transactions: a batch's effects and the offsets after it are
committed in one read-DB transaction, and on partition assignment the consumer seeks to the
stored offsets (Kafka's committed offsets are written afterwards, for monitoring only).

Fencing: each batch transaction first locks its partitions' offset rows and checks they still
hold the positions this consumer started from. A consumer that lost a partition in a rebalance
and still holds a batch for it finds the row moved on and rolls back: it cannot apply or commit
stale work.

Log resets: the embedded broker forgets everything on restart and never answers
OffsetOutOfRange, so a stored offset may point past the end of a new, shorter log, or into a
new log that already grew past it. On assignment the projector checks that the record just
before its stored offset is the event it last applied (by event id); if not, or if the stored
offset is beyond the log's end, the log was reset and it starts that partition from the
beginning (re-applied events are duplicates and change nothing).

Run it with ``kessai projector`` or ``python -m projector``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio.to_thread
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.engine import Engine

from kessai import offsets
from kessai.broker import ensure_topic
from kessai.clock import utcnow
from kessai.settings import Settings
from projector import repository
from projector.apply import DecodedBatch, Record, apply_batch, decode_batch

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


class StaleAssignment(RuntimeError):
    """The stored offsets moved on under this consumer: another one owns the partition now."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied: int
    duplicates: int
    parked: int
    dead_letters: int


class ProjectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied = Counter(
            "kessai_projector_events_applied_total", "Events applied.", registry=registry
        )
        self.duplicates = Counter(
            "kessai_projector_duplicates_total", "Events skipped as duplicates.", registry=registry
        )
        self.parked = Counter(
            "kessai_projector_parked_total", "Events parked behind a gap.", registry=registry
        )
        self.dead_letters = Counter(
            "kessai_projector_dead_letters_total", "Records dead-lettered.", registry=registry
        )
        self.log_resets = Counter(
            "kessai_projector_log_resets_total",
            "Partitions whose log was found reset (started again from the beginning).",
            registry=registry,
        )
        self.lag = Gauge(
            "kessai_projector_lag_records",
            "Records between the projector's position and the end of the partition.",
            ["partition"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "kessai_projector_batch_seconds", "Time to apply one batch.", registry=registry
        )


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
        # Per assigned partition: the stored next_offset this consumer expects to find
        # (None: no row yet). Only the event loop touches it.
        self.expected: dict[int, int | None] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._zones: dict[str, ZoneInfo] = {}
        self._last_idle_check = 0.0
        self._last_applied = -math.inf  # monotonic time of the last batch that applied events
        self._seek_lock = asyncio.Lock()
        # Per partition: the position last seen by the idle check and since when.
        self._progress: dict[int, tuple[int | None, float]] = {}
        # Assigned partitions to seek to their stored offsets before anything else is applied
        # (a seek failed in the rebalance listener, or a batch of theirs was refused).
        self._unsought: set[TopicPartition] = set()
        # Seeks so far: records fetched before a seek are never applied after it.
        self._seeks = 0

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
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=self.settings.projector_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
            request_timeout_ms=max(self.settings.kafka_request_timeout_ms, 4_000),
            max_poll_records=self.settings.projector_batch_size,
            fetch_max_wait_ms=100,
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
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        if result.applied:
            self._last_applied = time.monotonic()
        self.metrics.applied.inc(result.applied)
        self.metrics.duplicates.inc(result.duplicates)
        self.metrics.parked.inc(result.parked)
        self.metrics.dead_letters.inc(result.dead_letters)
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
        records = batch.records
        now = utcnow()
        with self.engine.begin() as conn:
            stored = offsets.lock_offsets(conn, self.topic, expected)
            for p, position in expected.items():
                row = stored.get(p)
                if (row.next_offset if row is not None else None) != position:
                    raise StaleAssignment(p)
            snapshot = repository.load_snapshot(conn, batch.payment_ids)
            changes = apply_batch(batch, snapshot, lambda m: self._zone(conn, m))
            repository.write_changes(conn, changes, snapshot, now)
            new_offsets = {}
            for p in expected:
                last = max((r for r in records if r.partition == p), key=lambda r: r.offset)
                previous = stored.get(p)
                last_event_at = changes.last_event_at.get(p)
                if previous is not None and previous.last_event_at is not None:
                    last_event_at = max(filter(None, (last_event_at, previous.last_event_at)))
                new_offsets[p] = offsets.OffsetRow(
                    next_offset=last.offset + 1,
                    last_event_id=dict(last.headers).get("event_id", b"").decode() or None,
                    last_event_at=last_event_at,
                    caught_up_at=now
                    if p in caught_up
                    else (previous.caught_up_at if previous is not None else None),
                )
            offsets.save_offsets(conn, self.topic, new_offsets, now)
        return BatchResult(
            applied=changes.applied,
            duplicates=changes.duplicates,
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
        except Exception:
            # Never let the listener fail: aiokafka would keep the assignment unsought. The
            # batch loop seeks these partitions before it applies anything of theirs.
            log.exception("seeking assigned partitions failed; will retry from the loop")
            for tp in mine:
                self.expected.pop(tp.partition, None)
            self._unsought.update(mine)

    def on_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("revoked partitions %s", sorted(tp.partition for tp in revoked))
        for tp in revoked:
            self._progress.pop(tp.partition, None)
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
            await self._seek_to_stored_locked(tps)
            self._unsought.difference_update(tps)

    async def _seek_to_stored_locked(self, tps: Sequence[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        stored = await anyio.to_thread.run_sync(self._read_offsets, [tp.partition for tp in tps])
        begins = await consumer.beginning_offsets(list(tps))
        for tp in tps:
            row = stored.get(tp.partition)
            position: int
            if row is None:
                position = begins[tp]
                self.expected[tp.partition] = None
            elif not await self._log_matches(tp, row):
                log.warning(
                    "partition %d: the record before stored offset %d is not the event last "
                    "applied: the log was reset; starting again from its beginning",
                    tp.partition,
                    row.next_offset,
                )
                self.metrics.log_resets.inc()
                position = await anyio.to_thread.run_sync(
                    self._rewind, tp.partition, row, begins[tp]
                )
                self.expected[tp.partition] = position
            else:
                position = row.next_offset
                self.expected[tp.partition] = position
            consumer.seek(tp, position)
            self._seeks += 1

    async def _log_matches(self, tp: TopicPartition, row: offsets.OffsetRow) -> bool:
        """Whether the log still holds, just before the stored offset, the event last applied.

        Asked of the record itself rather than of the log's end offset: the embedded broker
        answers ListOffsets(latest) with the base offset of the last record batch plus one,
        not with the end of the log.
        """
        if row.next_offset == 0:
            return True
        probe = AIOKafkaConsumer(
            bootstrap_servers=self.settings.resolved_kafka_bootstrap(),
            enable_auto_commit=False,
            request_timeout_ms=max(self.settings.kafka_request_timeout_ms, 4_000),
        )
        await probe.start()
        try:
            probe.assign([tp])
            probe.seek(tp, row.next_offset - 1)
            fetched = await probe.getmany(tp, timeout_ms=3_000, max_records=1)
            records = fetched.get(tp, [])
            if not records or records[0].offset != row.next_offset - 1:
                return False
            if row.last_event_id is None:
                return True
            event_id = dict(records[0].headers).get("event_id", b"").decode()
            return bool(event_id == row.last_event_id)
        finally:
            await probe.stop()

    def _read_offsets(self, partitions: list[int]) -> dict[int, offsets.OffsetRow]:
        with self.engine.begin() as conn:
            return offsets.lock_offsets(conn, self.topic, partitions)

    def _rewind(self, partition: int, row: offsets.OffsetRow, position: int) -> int:
        """Store ``position`` for a reset partition; returns the stored position, which is
        another consumer's if it moved the row first (its batches verified their own)."""
        with self.engine.begin() as conn:
            current = offsets.lock_offsets(conn, self.topic, [partition]).get(partition)
            if current is None or current.next_offset != row.next_offset:
                return current.next_offset if current is not None else position
            offsets.save_offsets(
                conn,
                self.topic,
                {partition: offsets.OffsetRow(position, None, row.last_event_at, row.caught_up_at)},
                utcnow(),
            )
        return position

    async def _idle_checks(self) -> None:
        """Once a second: lag metrics, log resets while assigned, and the caught-up stamp."""
        consumer = self._consumer
        now = time.monotonic()
        if consumer is None or now - self._last_idle_check < IDLE_CHECK_SECONDS:
            return
        self._last_idle_check = now
        tps = [tp for tp in consumer.assignment() if tp.partition in self.expected]
        busy = now - self._last_applied < STALL_SECONDS
        at_end = []
        stalled = []
        for tp in tps:
            # The high watermark of the last fetch response; not end_offsets() (see above).
            end = consumer.highwater(tp)
            position = None if end is None else await consumer.position(tp)
            seen, since = self._progress.setdefault(tp.partition, (position, now))
            if seen != position or (end is not None and position == end):
                self._progress[tp.partition] = (position, now)
            elif now - since > (BUSY_STALL_SECONDS if busy else STALL_SECONDS):
                log.warning(
                    "partition %d: no progress for %.0f s at position %s (log end %s); "
                    "seeking it again",
                    tp.partition,
                    now - since,
                    position,
                    end,
                )
                self._progress[tp.partition] = (position, now)
                stalled.append(tp)
            if end is None or position is None:
                continue
            self.metrics.lag.labels(str(tp.partition)).set(max(end - position, 0))
            if position > end:
                self.metrics.log_resets.inc()
                log.warning("partition %d: position beyond the log end: reset", tp.partition)
                await self._seek_to_stored([tp])
            elif position == end and self.expected.get(tp.partition) == position:
                at_end.append(tp.partition)
        if stalled:
            await self._seek_to_stored(stalled)
        if at_end:
            positions = {p: self.expected.get(p) for p in at_end}
            await anyio.to_thread.run_sync(self._stamp_caught_up, positions)

    def _stamp_caught_up(self, positions: dict[int, int | None]) -> None:
        now = utcnow()
        with self.engine.begin() as conn:
            stored = offsets.lock_offsets(conn, self.topic, positions)
            fresh = {}
            for p, position in positions.items():
                row = stored.get(p)
                if position is None and row is None:
                    fresh[p] = offsets.OffsetRow(0, None, None, now)
                elif row is not None and row.next_offset == position:
                    fresh[p] = offsets.OffsetRow(
                        row.next_offset, row.last_event_id, row.last_event_at, now
                    )
            offsets.save_offsets(conn, self.topic, fresh, now)


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
    from prometheus_client import start_http_server

    from kessai.db import create_db_engine
    from kessai.runtime import freeze_startup_heap, stop_on_signals

    engine = create_db_engine(settings.resolved_read_db_url(), pool_size=4)
    freeze_startup_heap()
    registry = CollectorRegistry()
    if settings.projector_metrics_port is not None:
        start_http_server(settings.projector_metrics_port, addr="127.0.0.1", registry=registry)
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
