"""One reconciliation run, and the schedule that repeats it.

A run: take the lock (one run at a time across instances), pick the payments to check (those
with events at or after the watermark minus the safety margin; ``full``: all), compare them in
chunks with the read side (fold of the write store's events vs. the read row and its refunds;
first by fingerprints both databases compute, then payment by payment only where those differ:
see ``reconciler.compare``),
look at parked events, open dead letters and the outbox, confirm what differs with a second
look (projector lag is not drift), repair (unless ``dry_run``): reset rows that are wrong at
their own version, re-publish every event of each affected payment, wait until the projector
has brought them in line; then check the merchant totals of the days touched against their
rows and rewrite wrong ones. Record the run and its findings; advance the watermark only when
everything checked is consistent, and never past an event still in the outbox.

Exit codes: 0 consistent (after repair), 1 drift remains, 2 the run could not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.engine import Engine

from kessai.broker import BrokerUnavailable
from kessai.clock import utcnow
from kessai.ids import timestamp_ms
from kessai.schema import read, write
from kessai.settings import Settings
from reconciler import compare, records, totals
from reconciler.compare import Event
from reconciler.records import Finding, LockHeld, Scope
from reconciler.republish import republisher

log = logging.getLogger(__name__)

__all__ = ["Reconciler", "ReconcilerMetrics", "RunResult"]

EXIT_CONSISTENT, EXIT_DRIFT, EXIT_FAILED = 0, 1, 2
PAYMENT_KINDS = {"missing", "mismatch", "parked", "dead_letter"}
CHUNKS_IN_FLIGHT = 2
EXTRA_SLACK = timedelta(minutes=1)
"""An event's id is taken right after its occurred_at: a day's events have ids within this of
the day's span."""
T = TypeVar("T")
ProgressCallback = Callable[[int, int | None], None]
# What makes a run "failed" (exit 2) rather than a crash. LockHeld mid-run: the lock lapsed
# (a run longer than KESSAI_RECONCILE_LOCK_SECONDS between renewals) and another run took it.
FAILURES = (
    LockHeld,
    sa.exc.SQLAlchemyError,
    BrokerUnavailable,
    KafkaError,
    OSError,
    TimeoutError,
)


@dataclass(slots=True)
class RunResult:
    run_id: int | None
    mode: str
    dry_run: bool
    outcome: str
    payments_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    watermark_from: str | None = None
    watermark_to: str | None = None
    error: str | None = None
    scope: str = "everything"
    """What the run checked (``Scope.text``): "consistent" is consistent within it."""

    @property
    def exit_code(self) -> int:
        return {"consistent": EXIT_CONSISTENT, "drift": EXIT_DRIFT}.get(self.outcome, EXIT_FAILED)

    @property
    def repaired_count(self) -> int:
        return sum(1 for f in self.findings if f.repaired)


class Stopped(Exception):
    """SIGINT or SIGTERM arrived during a run: it ends between two phases."""


class ReconcilerMetrics:
    """What ``/metrics`` shows of the scheduled reconciler (``KESSAI_RECONCILER_METRICS_PORT``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_success = Gauge(
            "kessai_reconcile_last_success_timestamp_seconds",
            "Start of the last run that went through to the end (consistent or drift), by "
            "scope: full (a full audit) or incremental.",
            ["scope"],
            registry=registry,
        )
        self.runs = Counter(
            "kessai_reconcile_runs_total",
            "Runs by scope and outcome (consistent, drift, failed, stopped, skipped: another "
            "run held the lock).",
            ["scope", "outcome"],
            registry=registry,
        )

    def observe(self, result: RunResult, started_at: datetime) -> None:
        self.runs.labels(result.mode, result.outcome).inc()
        if result.outcome in records.COMPLETED and not result.dry_run:
            self.last_success.labels(result.mode).set(started_at.timestamp())


class Reconciler:
    def __init__(
        self,
        *,
        write_engine: Engine,
        read_engine: Engine,
        settings: Settings,
        owner: str | None = None,
        metrics: ReconcilerMetrics | None = None,
    ) -> None:
        self.write = write_engine
        self.read = read_engine
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.metrics = metrics
        self._lock_lost: LockHeld | None = None
        self._stop: asyncio.Event | None = None
        self._pause = 0.0

    # -- one run -------------------------------------------------------------------------------

    async def run(
        self,
        *,
        full: bool = False,
        dry_run: bool = False,
        progress: ProgressCallback | None = None,
        stop: asyncio.Event | None = None,
        pause_seconds: float = 0.0,
    ) -> RunResult:
        """One run. ``stop``: set by SIGINT/SIGTERM; the run ends at the next phase, recorded
        as ``stopped``, and releases its lock at once. ``pause_seconds``: a pause between two
        blocks of payments (a scheduled full audit, so the dashboards keep the read database)."""
        mode = "full" if full else "incremental"
        result = RunResult(run_id=None, mode=mode, dry_run=dry_run, outcome="failed")
        started_at = utcnow()
        try:
            watermark = await asyncio.to_thread(
                records.acquire_lock, self.read, self.owner, self.settings.reconcile_lock_seconds
            )
        except LockHeld as exc:
            # Not a failure, and not recorded: a live run is doing the work (metrics count it).
            result.outcome = "skipped"
            result.error = str(exc)
            self._observe(result, started_at)
            return result
        except FAILURES as exc:
            result.error = f"cannot reach the read database: {exc!r}"
            self._observe(result, started_at)
            return result
        self._lock_lost, self._stop, self._pause = None, stop, pause_seconds
        finished = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(finished))
        new_watermark: str | None = None
        try:
            lower = None if full else self._lower_bound(watermark)
            scope = _scope_of(lower)
            result.scope = scope.text
            result.watermark_from = None if full else watermark
            result.run_id = await asyncio.to_thread(
                records.start_run,
                self.read,
                mode=mode,
                dry_run=dry_run,
                watermark_from=result.watermark_from,
                started_at=started_at,
                scope=scope,
            )
            await self._run(result, lower, scope, progress)
            if result.outcome == "consistent" and not dry_run:
                new_watermark = result.watermark_to
        except Stopped:
            log.warning("reconciliation stopped")
            result.outcome = "stopped"
            result.error = "stopped by a signal before the end"
        except FAILURES as exc:
            log.warning("reconciliation failed", exc_info=True)
            result.outcome = "failed"
            result.error = repr(exc)
        finally:
            # Let a renewal in flight finish first: one landing after the release would hold
            # the lock again for its whole lifetime.
            finished.set()
            await heartbeat
            # Recording the run and releasing the lock are independent: a failure to record
            # must not keep the lock held or lose the watermark.
            if result.run_id is not None:
                try:
                    await asyncio.to_thread(
                        records.finish_run,
                        self.read,
                        result.run_id,
                        outcome=result.outcome,
                        watermark_to=result.watermark_to,
                        payments_checked=result.payments_checked,
                        findings=result.findings,
                        error=result.error,
                    )
                except FAILURES:
                    log.exception("could not record the end of run %s", result.run_id)
            try:
                await asyncio.to_thread(
                    records.release_lock, self.read, self.owner, watermark=new_watermark
                )
            except FAILURES:
                log.exception("could not release the reconciler lock; it lapses by itself")
            self._observe(result, started_at)
        return result

    def _observe(self, result: RunResult, started_at: datetime) -> None:
        if self.metrics is not None:
            self.metrics.observe(result, started_at)

    def _lower_bound(self, watermark: str | None) -> uuid.UUID:
        """An incremental run's start in the id space: the watermark minus the safety margin
        (no watermark yet: the beginning)."""
        if watermark is None:
            return compare.bound_at_ms(0)
        margin_ms = int(self.settings.reconcile_safety_margin_seconds * 1000)
        return compare.bound_at_ms(timestamp_ms(uuid.UUID(watermark)) - margin_ms)

    async def _heartbeat(self, finished: asyncio.Event) -> None:
        """Renew the lock every third of its lifetime while the run works, whatever phase it is
        in: a short lifetime then frees the lock soon after a killed run, never under a live
        one. A lock found taken by another run ends this one at its next phase."""
        ttl = self.settings.reconcile_lock_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), timeout=ttl / 3)
            if finished.is_set():
                return
            try:
                await asyncio.to_thread(records.acquire_lock, self.read, self.owner, ttl)
            except LockHeld as exc:
                self._lock_lost = exc
                return
            except FAILURES:
                log.warning("could not renew the reconciler lock; trying again", exc_info=True)

    def _next_phase(self) -> None:
        """Between two phases (and two blocks): stop if asked, or if the lock was lost."""
        if self._lock_lost is not None:
            raise self._lock_lost
        if self._stop is not None and self._stop.is_set():
            raise Stopped

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on a stop (and end the run)."""
        if self._stop is None:
            await asyncio.sleep(seconds)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        self._next_phase()

    async def _run(
        self,
        result: RunResult,
        lower: uuid.UUID | None,
        scope: Scope,
        progress: ProgressCallback | None,
    ) -> None:
        """``lower``: where an incremental run starts in the id space (None: a full audit)."""
        s = self.settings
        now = utcnow()
        outbox = await asyncio.to_thread(
            self._in_write,
            lambda c: compare.outbox_view(
                c, now - timedelta(seconds=s.reconcile_outbox_stuck_seconds)
            ),
        )
        # The next run starts from this run's start (UUIDv7 time), but never past an event the
        # relay has not published yet.
        upper = compare.bound_at(now)
        if outbox.oldest_event_id is not None:
            upper = min(upper, outbox.oldest_event_id)
        result.watermark_to = str(upper)
        cut = self._cut(lower, upper)

        parked, letters = await asyncio.to_thread(self._in_read, compare.parked_and_dead_letters)
        flagged = {pid for pid, _, _ in parked} | {pid for _, pid, _, _ in letters if pid}
        zones = await asyncio.to_thread(
            self._in_read, lambda c: totals.zone_lookup(c, s.default_merchant_time_zone)
        )
        fallback = ZoneInfo(s.default_merchant_time_zone)

        suspects: dict[uuid.UUID, Finding] = {}
        # Two blocks in flight, and the orphan scan alongside: while one waits for a database,
        # another is worked on. SQLite: one thing at a time (its transactions lock the file,
        # and two threads each holding one database while waiting for the other deadlock).
        parallel = "sqlite" not in (self.write.dialect.name, self.read.dialect.name)
        in_flight_at_most = CHUNKS_IN_FLIGHT if parallel else 1
        checking: set[asyncio.Task[None]] = set()

        in_flight = {pid.bytes for pid in outbox.in_flight}

        async def checked(chunk: list[bytes], key_range: bool | None) -> None:
            suspects.update(await asyncio.to_thread(self._check_chunk, chunk, key_range))

        async def check(chunk: Sequence[bytes], *, whole_range: bool = False) -> None:
            """``chunk``: sorted payment keys (``compare.key_of``). ``whole_range``: it is every
            write-store payment from its first to its last key (a keyset page), so it is a key
            range unless something was left out."""
            kept = [key for key in chunk if key not in in_flight]
            if not kept:
                return
            result.payments_checked += len(kept)
            key_range = (len(kept) == len(chunk)) if whole_range else None
            while len(checking) >= in_flight_at_most:
                done, _ = await asyncio.wait(checking, return_when=asyncio.FIRST_COMPLETED)
                checking.difference_update(done)
                for task in done:
                    task.result()
            checking.add(asyncio.create_task(checked(kept, key_range)))

        async def all_checked() -> None:
            while checking:
                done, _ = await asyncio.wait(checking, return_when=asyncio.FIRST_COMPLETED)
                checking.difference_update(done)
                for task in done:
                    task.result()

        block = max(s.reconcile_chunk_size, compare.FINGERPRINT_PAGE)
        # Read rows with no payment behind them, looked for while the payments are compared.
        # Certain at first sight: a read row exists only after its event committed, so there
        # is no lag to wait out.
        looking: asyncio.Task[list[compare.Orphan]] | None = None
        # The write store's sums of the scope's events for the totals: they do not depend on
        # what the comparison finds (the events are immutable), and the grouping is mostly the
        # database's work, so it runs alongside the comparison.
        summing: asyncio.Task[totals.Expected] | None = None
        if parallel:
            looking = asyncio.create_task(asyncio.to_thread(self._find_orphans, lower))
            summing = asyncio.create_task(
                asyncio.to_thread(self._sum_scope, lower, cut, outbox.in_flight, zones, fallback)
            )
        try:
            if lower is None:
                total = await asyncio.to_thread(self._in_write, compare.count_payments)
                if progress:
                    progress(0, total)
                done = 0
                after: bytes | None = None
                while True:
                    chunk = await asyncio.to_thread(self._next_keys, after, block)
                    if not chunk:
                        break
                    after = chunk[-1]
                    await check(chunk, whole_range=True)
                    done += len(chunk)
                    if self._pause > 0:
                        await self._sleep(self._pause)
                    self._next_phase()
                    if progress:
                        progress(done, total)
            else:
                keys = await asyncio.to_thread(
                    self._in_write, lambda c: compare.payment_keys_since(c, lower)
                )
                keys |= {pid.bytes for pid in flagged}
                ordered = sorted(keys)
                if progress:
                    progress(0, len(ordered))
                for start in range(0, len(ordered), block):
                    await check(ordered[start : start + block])
                    self._next_phase()
                    if progress:
                        progress(min(start + block, len(ordered)), len(ordered))
            await all_checked()
        finally:
            for task in checking:
                task.cancel()
            alongside: list[asyncio.Task[Any]] = [t for t in (looking, summing) if t is not None]
            for side_task in alongside:
                if not side_task.done():
                    with contextlib.suppress(BaseException):
                        await side_task
        if looking is not None:
            orphans = looking.result()
        else:
            orphans = await asyncio.to_thread(self._find_orphans, lower)
        self._next_phase()

        # A second look: what the projector was merely late with is not drift.
        if (suspects or parked or letters) and s.reconcile_confirm_seconds > 0:
            await self._sleep(s.reconcile_confirm_seconds)
            suspects = await asyncio.to_thread(self._compare_chunk, sorted(suspects), None)
            parked, letters = await asyncio.to_thread(
                self._in_read, compare.parked_and_dead_letters
            )

        findings: list[Finding] = sorted(suspects.values(), key=lambda f: str(f.payment_id))
        findings += [
            Finding(kind="parked", payment_id=pid, details={"version": v, "reason": reason})
            for pid, v, reason in parked
            if pid not in outbox.in_flight
        ]
        findings += [
            Finding(
                kind="dead_letter",
                payment_id=pid,
                details={"dead_letter_id": i, "version": v, "reason": reason},
            )
            for i, pid, v, reason in letters
            if pid is None or pid not in outbox.in_flight
        ]
        if outbox.stuck_count:
            findings.append(
                Finding(
                    kind="outbox_stuck",
                    details={
                        "rows": outbox.stuck_count,
                        "oldest_created_at": outbox.oldest_created_at,
                        "older_than_seconds": s.reconcile_outbox_stuck_seconds,
                    },
                )
            )

        unresolved: set[uuid.UUID] = set()
        # Where the repairs changed read rows: (merchant, moments) whose totals they may move.
        touched: dict[str, list[datetime]] = {}
        if not result.dry_run:
            self._next_phase()
            findings, unresolved, republished = await self._repair(findings)
            for event in republished:
                touched.setdefault(event.merchant_id, []).append(event.occurred_at)
            if orphans:
                await asyncio.to_thread(self._delete, sorted(o.payment_id for o in orphans))
                for o in orphans:
                    touched.setdefault(o.merchant_id, []).extend(o.moments)
        findings += [
            Finding(
                kind="orphan",
                payment_id=o.payment_id,
                merchant_id=o.merchant_id,
                details={
                    "captured_amount": o.captured_amount,
                    "refunded_amount": o.refunded_amount,
                    "version": o.version,
                },
                repaired=not result.dry_run,
            )
            for o in orphans
        ]

        skip = {
            f.merchant_id
            for f in findings
            if f.kind in PAYMENT_KINDS and not f.repaired and f.merchant_id
        }
        if result.dry_run:
            skip = set()
        # The days those repairs changed rows in, before the scope: checked too (their events
        # read from the day's start), a few at most; any more are reported unverified.
        beyond = totals.days_beyond(scope, touched, zones, fallback)
        extra: dict[str, set[date]] = {}
        left: dict[str, set[date]] = {}
        for merchant_id, day in sorted((m, d) for m, ds in beyond.items() for d in ds):
            taken = sum(len(ds) for ds in extra.values()) < totals.EXTRA_DAYS_AT_MOST
            (extra if taken else left).setdefault(merchant_id, set()).add(day)
        self._next_phase()
        if summing is not None:
            expected = summing.result()
        else:
            expected = await asyncio.to_thread(
                self._sum_scope, lower, cut, outbox.in_flight, zones, fallback
            )
        findings += await asyncio.to_thread(
            self._check_totals,
            scope,
            lower,
            cut,
            expected,
            outbox.in_flight,
            not result.dry_run,
            skip,
            extra,
            totals.day_windows(extra, zones, fallback, slack=EXTRA_SLACK),
            set(touched),
        )
        findings += totals.unverified(scope, left)
        result.findings = findings
        result.outcome = "consistent" if all(f.repaired for f in findings) else "drift"
        if unresolved:
            log.warning("%d payment(s) still differ after repair", len(unresolved))

    # -- steps ---------------------------------------------------------------------------------

    def _in_write(self, fn: Callable[[sa.Connection], T]) -> T:
        with self.write.connect() as conn:
            return fn(conn)

    def _in_read(self, fn: Callable[[sa.Connection], T]) -> T:
        with self.read.connect() as conn:
            return fn(conn)

    def _next_keys(self, after: bytes | None, limit: int) -> list[bytes]:
        with self.write.connect() as conn:
            return compare.payment_keys_after(conn, after, limit)

    def _check_chunk(
        self, chunk: Sequence[bytes], key_range: bool | None
    ) -> dict[uuid.UUID, Finding]:
        """Fingerprints of the chunk on both sides; payment by payment only if they differ.
        ``chunk`` is sorted and distinct; ``key_range`` None: find out."""
        with self.write.connect() as wconn, self.read.connect() as rconn:
            if key_range is None:
                key_range = compare.is_key_range(wconn, chunk)
            expected = compare.write_fingerprint(wconn, chunk, key_range=key_range)
            actual = compare.read_fingerprint(rconn, chunk, key_range=key_range)
            if actual == expected:
                return {}
            size = self.settings.reconcile_chunk_size
            if len(chunk) <= size:
                ids = _ids(chunk)
                events, rows = compare.load_events(wconn, ids), compare.load_read(rconn, ids)
                return _compare_loaded(ids, events, rows, None)
            found: dict[uuid.UUID, Finding] = {}
            for start in range(0, len(chunk), size):
                # The pieces of a key range are key ranges too.
                piece = chunk[start : start + size]
                expected = compare.write_fingerprint(wconn, piece, key_range=key_range)
                actual = compare.read_fingerprint(rconn, piece, key_range=key_range)
                if actual != expected:
                    ids = _ids(piece)
                    events, rows = compare.load_events(wconn, ids), compare.load_read(rconn, ids)
                    found.update(_compare_loaded(ids, events, rows, None))
            return found

    def _compare_chunk(
        self,
        chunk: Sequence[uuid.UUID],
        note_days: Callable[[Iterable[Event]], None] | None,
    ) -> dict[uuid.UUID, Finding]:
        if not chunk:
            return {}
        with self.write.connect() as wconn:
            events = compare.load_events(wconn, chunk)
        with self.read.connect() as rconn:
            rows = compare.load_read(rconn, chunk)
        return _compare_loaded(chunk, events, rows, note_days)

    async def _repair(
        self, findings: list[Finding]
    ) -> tuple[list[Finding], set[uuid.UUID], list[totals.EventRow]]:
        """Re-publish the affected payments and wait until the read side matches. Also returns
        the re-published events (where the totals may move)."""
        targets = sorted(
            {f.payment_id for f in findings if f.kind in PAYMENT_KINDS and f.payment_id}
        )
        if not targets:
            return findings, set(), []
        bodies = await asyncio.to_thread(
            self._in_write, lambda c: _bodies(c, targets, self.settings.reconcile_chunk_size)
        )
        known = {row[0] for row in bodies}
        republished = await asyncio.to_thread(
            self._in_write, lambda c: totals.events_one_by_one(c, since=None, payment_ids=known)
        )
        reset = sorted(
            f.payment_id
            for f in findings
            if f.payment_id in known
            and ((f.kind == "mismatch" and (f.details or {}).get("reset")) or f.kind == "missing")
        )
        async with republisher(self.settings) as send:
            if reset:
                resetting = set(reset)
                await asyncio.to_thread(
                    self._reset, reset, [e for e in republished if e.payment_id in resetting]
                )
            await send(bodies)
        remaining = set(known)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reconcile_verify_timeout_seconds
        while remaining:
            remaining = await asyncio.to_thread(self._still_wrong, sorted(remaining))
            if not remaining or loop.time() > deadline:
                break
            await self._sleep(0.2)
        merchants = await asyncio.to_thread(self._merchants_of, sorted(known))
        repaired = [
            replace(
                f,
                repaired=f.payment_id in known and f.payment_id not in remaining,
                merchant_id=f.merchant_id or merchants.get(f.payment_id),
            )
            if f.kind in PAYMENT_KINDS and f.payment_id is not None
            else f
            for f in findings
        ]
        return repaired, remaining, republished

    def _find_orphans(self, lower: uuid.UUID | None) -> list[compare.Orphan]:
        """Read payments (and refund rows alone) at or above ``lower`` (None: all) that have no
        event in the write store."""
        page = max(self.settings.reconcile_chunk_size, 1)
        # Fingerprinted pages are cheap: larger ones, fewer round trips.
        fingerprinted = max(page, compare.FINGERPRINT_PAGE)
        candidates: list[uuid.UUID] = []
        with self.read.connect() as rconn, self.write.connect() as wconn:
            after: uuid.UUID | None = None
            # Pages whose ids fingerprint the same on both sides hold no orphan: skipped
            # without reading their ids.
            while page > 1 and (
                last := compare.read_page_end(rconn, lower=lower, after=after, size=fingerprinted)
            ):
                same = compare.ids_fingerprint(
                    rconn, read.payments, lower=lower, after=after, last=last
                ) == compare.ids_fingerprint(
                    wconn, write.events, lower=lower, after=after, last=last
                )
                if not same:
                    candidates += compare.unknown_between(
                        rconn, wconn, lower=lower, after=after, last=last
                    )
                after = last
            while ids := compare.read_payment_ids(rconn, lower=lower, after=after, limit=page):
                after = ids[-1]
                candidates += sorted(set(ids) - compare.known_payments(wconn, ids))
            alone = sorted(compare.refunds_without_payment(rconn, lower))
            for start in range(0, len(alone), page):
                chunk = alone[start : start + page]
                candidates += sorted(set(chunk) - compare.known_payments(wconn, chunk))
            orphans: list[compare.Orphan] = []
            for start in range(0, len(candidates), page):
                orphans += compare.load_orphans(rconn, candidates[start : start + page])
        return orphans

    def _reset(self, payment_ids: list[uuid.UUID], events: list[totals.EventRow]) -> None:
        """Remove the read rows (payment and refunds) of payments that are wrong at their own
        version, so the re-published ``events`` (all of theirs) are applied rather than skipped
        as duplicates; in the same transaction, take out of the totals what applying them again
        will add, so the totals end as they were (right ones stay right)."""
        self._delete(payment_ids, compensate=events)

    def _delete(
        self, payment_ids: list[uuid.UUID], compensate: list[totals.EventRow] | None = None
    ) -> None:
        """Remove read rows (payment and refunds), under the projector's offset locks."""
        with self.read.begin() as conn:
            totals.lock_projector(conn, self.settings.topic)
            if compensate:
                totals.compensate(
                    conn, compensate, default_zone=self.settings.default_merchant_time_zone
                )
            for start in range(0, len(payment_ids), self.settings.reconcile_chunk_size):
                chunk = payment_ids[start : start + self.settings.reconcile_chunk_size]
                conn.execute(read.refunds.delete().where(read.refunds.c.payment_id.in_(chunk)))
                conn.execute(read.payments.delete().where(read.payments.c.payment_id.in_(chunk)))

    def _still_wrong(self, payment_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        wrong = set(self._compare_chunk(payment_ids, None))
        with self.read.connect() as conn:
            wrong |= set(
                conn.execute(
                    sa.select(read.parked_events.c.payment_id).where(
                        read.parked_events.c.payment_id.in_(payment_ids)
                    )
                ).scalars()
            )
            wrong |= set(
                conn.execute(
                    sa.select(read.dead_letters.c.payment_id).where(
                        read.dead_letters.c.payment_id.in_(payment_ids),
                        read.dead_letters.c.status == "open",
                    )
                ).scalars()
            )
        return wrong

    def _merchants_of(self, payment_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        from kessai.schema.write import events

        with self.write.connect() as conn:
            return dict(
                conn.execute(
                    sa.select(events.c.payment_id, events.c.merchant_id).where(
                        events.c.payment_id.in_(payment_ids), events.c.version == 1
                    )
                ).all()
            )

    def _cut(self, lower: uuid.UUID | None, upper: uuid.UUID) -> uuid.UUID:
        """Where the totals stop trusting the checked payments: ``upper`` minus the safety
        margin (never below ``lower``). Events from the cut on are counted one by one."""
        margin_ms = int(self.settings.reconcile_safety_margin_seconds * 1000)
        cut = compare.bound_at_ms(timestamp_ms(upper) - margin_ms)
        return cut if lower is None else max(cut, lower)

    def _sum_scope(
        self,
        lower: uuid.UUID | None,
        cut: uuid.UUID,
        in_flight: set[uuid.UUID],
        zones: dict[str, ZoneInfo],
        fallback: ZoneInfo,
    ) -> totals.Expected:
        """The scope's events before the cut, summed by the write store for the totals (no
        lock: the write store's events never change), in each merchant's local buckets."""
        if lower is not None and lower == compare.bound_at_ms(0):
            lower = None  # the very beginning: no bound to read the index by
        with self.write.connect() as wconn:
            grouped = totals.sum_events(wconn, lower=lower, below=cut, leave_out=in_flight)
        return totals.expected_from(grouped, zones, fallback)

    def _check_totals(
        self,
        scope: Scope,
        lower: uuid.UUID | None,
        cut: uuid.UUID,
        expected: totals.Expected,
        in_flight: set[uuid.UUID],
        repair: bool,
        skip: set[str],
        extra_days: dict[str, set[date]],
        extra_windows: list[tuple[datetime, datetime]],
        touched_merchants: set[str],
    ) -> list[Finding]:
        """The totals of every bucket ``scope`` covers against the events they count (see
        ``reconciler.totals``). ``expected``: the scope's events before the ``cut``, summed by the
        write store outside the projector's locks; the few after it are read under them, with
        the totals."""
        with self.write.connect() as wconn:
            # ``extra_days``' events before the scope: each day's span of ids (widened for ids
            # taken just after their occurred_at); no span reaches into the scope.
            for start, end in extra_windows:
                if lower is None:
                    break
                first = compare.bound_at(start)
                below = min(compare.bound_at(end), lower)
                if first < below:
                    more = totals.sum_events(wconn, lower=first, below=below, leave_out=in_flight)
                    expected = totals.expected_from(
                        expected.grouped + more, expected.zones, expected.fallback
                    )
        check = functools.partial(
            totals.check_totals,
            scope=scope,
            expected=expected,
            default_zone=self.settings.default_merchant_time_zone,
            skip_repair=skip,
            also=extra_days,
            touched_merchants=touched_merchants,
        )
        # A first look without the projector's locks (one snapshot): a clean run holds them
        # only for the second look, at the merchants that differ, if any.
        with self.read.connect() as rconn, self.write.connect() as wconn:
            singles = totals.events_one_by_one(wconn, since=cut, payment_ids=in_flight)
            first_look = check(rconn, one_by_one=singles, repair=False)
        differ = {f.merchant_id for f in first_look if f.merchant_id is not None}
        if not differ:
            return []
        with self.read.begin() as rconn, self.write.connect() as wconn:
            totals.lock_projector(rconn, self.settings.topic)
            singles = totals.events_one_by_one(wconn, since=cut, payment_ids=in_flight)
            return check(rconn, one_by_one=singles, repair=repair, merchants=differ)

    # -- on a schedule ---------------------------------------------------------------------------

    async def run_every(
        self,
        interval_seconds: float,
        stop: asyncio.Event,
        *,
        full: bool = False,
        dry_run: bool = False,
        full_audit_every: float = 0.0,
        on_result: Callable[[RunResult], None] | None = None,
    ) -> int:
        """Run, wait ``interval_seconds``, repeat until ``stop``; return the last exit code.

        Every ``full_audit_every`` seconds (0: never) the run is a full audit instead, throttled
        by ``KESSAI_RECONCILE_FULL_AUDIT_PAUSE_SECONDS``. It is due that long after the start of
        the last completed full audit recorded in the read database (none: at once), so a
        restart neither skips nor repeats it, and neither does a second instance."""
        code = EXIT_CONSISTENT
        while not stop.is_set():
            if not full and not dry_run and await self._full_audit_due(full_audit_every):
                pause = self.settings.reconcile_full_audit_pause_seconds
                result = await self.run(full=True, stop=stop, pause_seconds=pause)
            else:
                result = await self.run(full=full, dry_run=dry_run, stop=stop)
            code = result.exit_code
            if on_result is not None:
                on_result(result)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        return code

    async def _full_audit_due(self, every: float) -> bool:
        if every <= 0:
            return False
        try:
            last = await asyncio.to_thread(records.last_completed, self.read, mode="full")
        except FAILURES:
            return False  # the run itself will say what is unreachable
        return last is None or (utcnow() - last).total_seconds() >= every

    def load_last_successes(self) -> None:
        """Set the last-success metric from the recorded runs (a restarted process knows)."""
        if self.metrics is None:
            return
        for mode in ("full", "incremental"):
            last = records.last_completed(self.read, mode=mode)
            if last is not None:
                self.metrics.last_success.labels(mode).set(last.timestamp())


def _scope_of(lower: uuid.UUID | None) -> Scope:
    """A run from ``lower`` on (None, or the very beginning: everything)."""
    if lower is None or lower == compare.bound_at_ms(0):
        return Scope()
    return Scope(after=datetime.fromtimestamp(timestamp_ms(lower) / 1000, UTC))


def _ids(keys: Sequence[bytes]) -> list[uuid.UUID]:
    return [uuid.UUID(bytes=key) for key in keys]


def _compare_loaded(
    chunk: Sequence[uuid.UUID],
    events: dict[uuid.UUID, list[Event]],
    rows: dict[uuid.UUID, compare.ReadPayment],
    note_days: Callable[[Iterable[Event]], None] | None,
) -> dict[uuid.UUID, Finding]:
    """Payment by payment: the fold of each payment's events against its read rows."""
    found: dict[uuid.UUID, Finding] = {}
    for pid in chunk:
        evs = events.get(pid, [])
        if note_days is not None:
            note_days(evs)
        finding = compare.compare(pid, evs, rows.get(pid))
        if finding is not None:
            found[pid] = finding
    return found


def _bodies(conn: sa.Connection, ids: list[uuid.UUID], chunk: int) -> list[compare.EventRow]:
    rows: list[compare.EventRow] = []
    for start in range(0, len(ids), chunk):
        rows += compare.load_bodies(conn, ids[start : start + chunk])
    return rows
