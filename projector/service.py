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
new log that already grew past it. On assignment, and whenever the consumer's connection to the
broker was lost (nothing fetched after that is applied first), the projector checks, for all
its partitions at once, that the record just before each stored offset is the event it last
applied (by event id); if not, or if the stored offset is beyond the log's end, the log was
reset and it starts that partition from the beginning (re-applied events are duplicates and
change nothing). Its consumers never make the broker auto-create the topic; if the topic is
missing (a restarted broker nobody re-created it on), the projector creates it.

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
from typing import Any
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
from kessai.broker import BrokerUnavailable, ensure_topic, refuse_auto_creation
from kessai.clock import utcnow
from kessai.settings import Settings
from projector import repository
from projector.apply import DecodedBatch, Record, apply_batch, decode_batch

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
STALL_SECONDS = 15.0
"""A partition whose position has not moved for this long while the log holds records past
it (or that never got a fetch answer) is sought again."""
PROBE_SECONDS = 3.0
"""How long the reset check waits for the records before the stored offsets (all partitions at
once); a partition it gets no answer for is checked again a second later."""
BUSY_STALL_SECONDS = 60.0
"""The same while batches of other partitions are being applied: a consumer behind its log
serves partitions by turns (aiokafka drains one prefetched partition buffer after another), so
a partition may wait its turn for more than ``STALL_SECONDS`` (seen at 100,000 preloaded
events); seeking it would throw its buffer away and send it to the back of the queue."""


class StaleAssignment(RuntimeError):
    """The stored offsets moved on under this consumer: another one owns the partition now."""


class ProbeFailed(RuntimeError):
    """The reset check could not read the log (the broker is away, or aiokafka gave up)."""


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
        refuse_auto_creation(consumer._client)
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
        stored = await anyio.to_thread.run_sync(self._read_offsets, [tp.partition for tp in tps])
        begins = await consumer.beginning_offsets(list(tps))
        matches = await self._logs_match(
            {tp: stored[tp.partition] for tp in tps if tp.partition in stored}
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
                    self._rewind, tp.partition, row, begins[tp]
                )
                self.expected[tp.partition] = position
            else:
                position = row.next_offset
                self.expected[tp.partition] = position
            consumer.seek(tp, position)
            self._seeks += 1
        return undecided

    async def _logs_match(
        self, rows: dict[TopicPartition, offsets.OffsetRow]
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
            result.update(await self._probe(todo))
        except ProbeFailed as exc:
            log.warning("the reset check failed: %s", exc)
        return {tp: result.get(tp) for tp in rows}

    async def _probe(
        self, todo: dict[TopicPartition, offsets.OffsetRow]
    ) -> dict[TopicPartition, bool]:
        decided: dict[TopicPartition, bool] = {}
        probe = AIOKafkaConsumer(
            bootstrap_servers=self.settings.resolved_kafka_bootstrap(),
            enable_auto_commit=False,
            request_timeout_ms=max(self.settings.kafka_request_timeout_ms, 4_000),
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
                    row = todo[tp]
                    records = fetched.get(tp)
                    end = probe.highwater(tp)
                    if records:
                        decided[tp] = _is_last_applied(records[0], row)
                    elif end is not None and end < row.next_offset:
                        decided[tp] = False  # the log ends before the stored offset
                    if tp in decided:
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
                log.warning("partition %d: position beyond the log end: reset?", tp.partition)
                stalled.append(tp)
            elif position == end and self.expected.get(tp.partition) == position:
                at_end.append(tp.partition)
        if stalled:
            try:
                await self._seek_to_stored(stalled)
            except Exception:
                log.exception("seeking partitions failed; will retry from the loop")
                self._leave_unsought(stalled)
        if at_end:
            positions = {p: self.expected.get(p) for p in at_end}
            await anyio.to_thread.run_sync(self._stamp_caught_up, positions)

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


def _is_last_applied(record: ConsumerRecord[bytes, bytes], row: offsets.OffsetRow) -> bool:
    if record.offset != row.next_offset - 1:
        return False
    if row.last_event_id is None:
        return True
    event_id = dict(record.headers).get("event_id", b"").decode()
    return bool(event_id == row.last_event_id)


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
