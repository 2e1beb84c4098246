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
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from aiokafka.errors import KafkaError
from sqlalchemy.engine import Engine

from kessai.broker import BrokerUnavailable
from kessai.clock import utcnow
from kessai.ids import timestamp_ms
from kessai.schema import read, write
from kessai.settings import Settings
from reconciler import compare, records, totals
from reconciler.compare import Event
from reconciler.records import Finding, LockHeld
from reconciler.republish import republisher

log = logging.getLogger(__name__)

EXIT_CONSISTENT, EXIT_DRIFT, EXIT_FAILED = 0, 1, 2
PAYMENT_KINDS = {"missing", "mismatch", "parked", "dead_letter"}
CHUNKS_IN_FLIGHT = 2
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

    @property
    def exit_code(self) -> int:
        return {"consistent": EXIT_CONSISTENT, "drift": EXIT_DRIFT}.get(self.outcome, EXIT_FAILED)

    @property
    def repaired_count(self) -> int:
        return sum(1 for f in self.findings if f.repaired)


class Reconciler:
    def __init__(
        self,
        *,
        write_engine: Engine,
        read_engine: Engine,
        settings: Settings,
        owner: str | None = None,
    ) -> None:
        self.write = write_engine
        self.read = read_engine
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._renewed = 0.0

    # -- one run -------------------------------------------------------------------------------

    async def run(
        self,
        *,
        full: bool = False,
        dry_run: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RunResult:
        mode = "full" if full else "incremental"
        result = RunResult(run_id=None, mode=mode, dry_run=dry_run, outcome="failed")
        try:
            watermark = await asyncio.to_thread(
                records.acquire_lock, self.read, self.owner, self.settings.reconcile_lock_seconds
            )
        except LockHeld as exc:
            result.error = str(exc)
            await self._record_failure(result)
            return result
        except FAILURES as exc:
            result.error = f"cannot reach the read database: {exc!r}"
            return result
        self._renewed = time.monotonic()
        new_watermark: str | None = None
        try:
            result.watermark_from = None if full else watermark
            started_at = utcnow()
            result.run_id = await asyncio.to_thread(
                records.start_run,
                self.read,
                mode=mode,
                dry_run=dry_run,
                watermark_from=result.watermark_from,
                started_at=started_at,
            )
            await self._run(result, watermark, progress)
            if result.outcome == "consistent" and not dry_run:
                new_watermark = result.watermark_to
        except FAILURES as exc:
            log.warning("reconciliation failed", exc_info=True)
            result.outcome = "failed"
            result.error = repr(exc)
        finally:
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
        return result

    async def _record_failure(self, result: RunResult) -> None:
        with contextlib.suppress(*FAILURES):
            result.run_id = await asyncio.to_thread(
                records.start_run,
                self.read,
                mode=result.mode,
                dry_run=result.dry_run,
                watermark_from=None,
                started_at=utcnow(),
            )
            await asyncio.to_thread(
                records.finish_run,
                self.read,
                result.run_id,
                outcome="failed",
                watermark_to=None,
                payments_checked=0,
                findings=[],
                error=result.error,
            )

    async def _run(
        self,
        result: RunResult,
        watermark: str | None,
        progress: ProgressCallback | None,
    ) -> None:
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

        parked, letters = await asyncio.to_thread(self._in_read, compare.parked_and_dead_letters)
        flagged = {pid for pid, _, _ in parked} | {pid for _, pid, _, _ in letters if pid}
        zones = await asyncio.to_thread(
            self._in_read, lambda c: totals.zone_lookup(c, s.default_merchant_time_zone)
        )
        fallback = ZoneInfo(s.default_merchant_time_zone)
        scope: dict[str, set[date]] = {}

        def note_hours(hours: Iterable[tuple[str, str]]) -> None:
            for merchant_id, hour in hours:
                zone = zones.get(merchant_id, fallback)
                scope.setdefault(merchant_id, set()).update(compare.local_days(hour, zone))

        suspects: dict[uuid.UUID, Finding] = {}
        # Two blocks in flight, and the orphan scan alongside: while one waits for a database,
        # another is worked on. SQLite: one thing at a time (its transactions lock the file,
        # and two threads each holding one database while waiting for the other deadlock).
        parallel = "sqlite" not in (self.write.dialect.name, self.read.dialect.name)
        in_flight_at_most = CHUNKS_IN_FLIGHT if parallel else 1
        checking: set[asyncio.Task[None]] = set()

        in_flight = {pid.bytes for pid in outbox.in_flight}

        async def checked(chunk: list[bytes], key_range: bool | None) -> None:
            found, hours = await asyncio.to_thread(self._check_chunk, chunk, key_range)
            note_hours(hours)
            suspects.update(found)

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
        lower: uuid.UUID | None = None  # incremental: the part of the id space to look at
        if result.mode == "incremental":
            lower = compare.bound_at_ms(0)
            if watermark is not None:
                margin_ms = int(s.reconcile_safety_margin_seconds * 1000)
                lower = compare.bound_at_ms(timestamp_ms(uuid.UUID(watermark)) - margin_ms)
        # Read rows with no payment behind them, looked for while the payments are compared.
        # Certain at first sight: a read row exists only after its event committed, so there
        # is no lag to wait out.
        looking: asyncio.Task[list[compare.Orphan]] | None = None
        if parallel:
            looking = asyncio.create_task(asyncio.to_thread(self._find_orphans, lower))
        try:
            if result.mode == "full":
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
                    await self._renew()
                    if progress:
                        progress(done, total)
            else:
                since = lower or compare.bound_at_ms(0)
                keys = await asyncio.to_thread(
                    self._in_write, lambda c: compare.payment_keys_since(c, since)
                )
                keys |= {pid.bytes for pid in flagged}
                ordered = sorted(keys)
                if progress:
                    progress(0, len(ordered))
                for start in range(0, len(ordered), block):
                    await check(ordered[start : start + block])
                    await self._renew()
                    if progress:
                        progress(min(start + block, len(ordered)), len(ordered))
            await all_checked()
        finally:
            for task in checking:
                task.cancel()
            if looking is not None and not looking.done():
                with contextlib.suppress(BaseException):
                    await looking
        if looking is not None:
            orphans = looking.result()
        else:
            orphans = await asyncio.to_thread(self._find_orphans, lower)
        for orphan in orphans:
            zone = zones.get(orphan.merchant_id, fallback)
            scope.setdefault(orphan.merchant_id, set()).update(
                moment.astimezone(zone).date() for moment in orphan.moments
            )

        # A second look: what the projector was merely late with is not drift.
        if (suspects or parked or letters) and s.reconcile_confirm_seconds > 0:
            await asyncio.sleep(s.reconcile_confirm_seconds)
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
        if not result.dry_run:
            findings, unresolved = await self._repair(findings)
            if orphans:
                await asyncio.to_thread(self._delete, sorted(o.payment_id for o in orphans))
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
        totals_scope = None if result.mode == "full" else scope
        findings += await asyncio.to_thread(
            self._check_totals, totals_scope, not result.dry_run, skip
        )
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
    ) -> tuple[dict[uuid.UUID, Finding], list[tuple[str, str]]]:
        """Fingerprints of the chunk on both sides; payment by payment only if they differ.
        ``chunk`` is sorted and distinct; ``key_range`` None: find out. Also returns the
        (merchant, UTC hour) of the chunk's events: where their totals are."""
        with self.write.connect() as wconn, self.read.connect() as rconn:
            if key_range is None:
                key_range = compare.is_key_range(wconn, chunk)
            expected = compare.write_fingerprint(wconn, chunk, key_range=key_range)
            hours = compare.hours_touched(wconn, chunk, key_range=key_range)
            actual = compare.read_fingerprint(rconn, chunk, key_range=key_range)
            if actual == expected:
                return {}, hours
            size = self.settings.reconcile_chunk_size
            if len(chunk) <= size:
                ids = _ids(chunk)
                events, rows = compare.load_events(wconn, ids), compare.load_read(rconn, ids)
                return _compare_loaded(ids, events, rows, None), hours
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
            return found, hours

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

    async def _renew(self) -> None:
        if time.monotonic() - self._renewed < self.settings.reconcile_lock_seconds / 3:
            return
        await asyncio.to_thread(
            records.acquire_lock, self.read, self.owner, self.settings.reconcile_lock_seconds
        )
        self._renewed = time.monotonic()

    async def _repair(self, findings: list[Finding]) -> tuple[list[Finding], set[uuid.UUID]]:
        """Re-publish the affected payments and wait until the read side matches."""
        targets = sorted(
            {f.payment_id for f in findings if f.kind in PAYMENT_KINDS and f.payment_id}
        )
        if not targets:
            return findings, set()
        bodies = await asyncio.to_thread(
            self._in_write, lambda c: _bodies(c, targets, self.settings.reconcile_chunk_size)
        )
        known = {row[0] for row in bodies}
        reset = sorted(
            f.payment_id
            for f in findings
            if f.payment_id in known
            and ((f.kind == "mismatch" and (f.details or {}).get("reset")) or f.kind == "missing")
        )
        async with republisher(self.settings) as send:
            if reset:
                await asyncio.to_thread(self._reset, reset)
            await send(bodies)
        remaining = set(known)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reconcile_verify_timeout_seconds
        while remaining:
            remaining = await asyncio.to_thread(self._still_wrong, sorted(remaining))
            if not remaining or loop.time() > deadline:
                break
            await asyncio.sleep(0.2)
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
        return repaired, remaining

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

    def _reset(self, payment_ids: list[uuid.UUID]) -> None:
        """Remove the read rows (payment and refunds) of payments that are wrong at their own
        version, so the re-published events are applied rather than skipped as duplicates. The
        totals they counted are rewritten from the rows afterwards."""
        self._delete(payment_ids)

    def _delete(self, payment_ids: list[uuid.UUID]) -> None:
        """Remove read rows (payment and refunds), under the projector's offset locks."""
        with self.read.begin() as conn:
            totals.lock_projector(conn, self.settings.topic)
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

    def _check_totals(
        self, scope: dict[str, set[date]] | None, repair: bool, skip: set[str]
    ) -> list[Finding]:
        with self.read.begin() as conn:
            totals.lock_projector(conn, self.settings.topic)
            return totals.check_totals(
                conn,
                scope,
                default_zone=self.settings.default_merchant_time_zone,
                repair=repair,
                skip_repair=skip,
            )

    # -- on a schedule ---------------------------------------------------------------------------

    async def run_every(
        self,
        interval_seconds: float,
        stop: asyncio.Event,
        *,
        full: bool = False,
        dry_run: bool = False,
        on_result: Callable[[RunResult], None] | None = None,
    ) -> int:
        """Run, wait ``interval_seconds``, repeat until ``stop``; return the last exit code."""
        code = EXIT_CONSISTENT
        while not stop.is_set():
            result = await self.run(full=full, dry_run=dry_run)
            code = result.exit_code
            if on_result is not None:
                on_result(result)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        return code


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


def parse_interval(text: str) -> float:
    """``30s``, ``5m``, ``1h`` (or plain seconds) to seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not an interval: {text!r} (use e.g. 30s, 5m, 1h)") from None
    if value <= 0:
        raise ValueError("the interval must be positive")
    return value * units[unit]
