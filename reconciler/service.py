"""One reconciliation run, and the schedule that repeats it.

A run takes the lock (one run at a time across instances), records its start, and goes through
its phases in order, each a function that takes values and returns values:

1. find (``reconciler.find``): the payments to check (those with events at or after the
   watermark minus the safety margin; ``full``: all) are compared with the read side, first by
   fingerprints both databases compute, then payment by payment where those differ
   (``reconciler.fingerprints``, ``reconciler.loaders``, ``reconciler.compare``); read rows
   with no payment behind them are looked for alongside; parked events, open dead letters and
   the outbox are looked at, and what differs is confirmed by a second look (projector lag is
   not drift);
2. repair (``reconciler.repair``; not in a dry run): rows wrong at their own version are reset,
   every event of each affected payment re-published, and the run waits until the projector
   has brought them in line; orphan rows are removed;
3. verify (``reconciler.verify``): the merchant totals of every bucket in scope against the
   events they count, wrong ones rewritten;
4. the ledger (``reconciler.wallets``): the trial balance of the events in scope, the wallet
   movement each of them owes (``reconciler.movements``), each wallet's chain of balances, and
   the read side's balances (repaired by re-publishing the wallet's movements);
5. the campaigns (``reconciler.campaigns``): every campaign's read row against the fold of its
   stream (repaired by re-publishing the campaign's events);
6. the grants: each campaign's budget against its grant rows and its postings in the write
   store (``reconciler.budgets``, never repaired), its figures on the read side (rewritten),
   and the eligible payments and registrations without their grant (``reconciler.missing``,
   their events re-published for the rewards service);
7. record: the outcome, the findings and the run are recorded, with what the run concluded
   of each check (``reconciler.checks``): its findings, those unrepaired, and how far it is
   verified; the watermark advances only when everything checked is consistent, each check's
   "verified up to" when that check is (and the run continues what it verified before), both
   never past an event still in the outbox, neither in a dry run.

No transaction spans two phases: each phase begins its own, and says where.

Exit codes: 0 consistent (after repair), 1 drift remains, 2 the run could not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.engine import Engine

from kessai.broker import BrokerUnavailable
from kessai.clock import utcnow
from kessai.ids import bound_at_ms, timestamp_ms
from kessai.settings import Settings
from reconciler import budgets, campaigns, checks, find, missing, records, repair, verify, wallets
from reconciler.context import ProgressCallback, RunContext
from reconciler.records import CheckResult, Finding, LockHeld, Scope, Verified
from reconciler.repair import PAYMENT_KINDS

log = logging.getLogger(__name__)

__all__ = ["PAYMENT_KINDS", "Reconciler", "ReconcilerMetrics", "RunResult"]

EXIT_CONSISTENT, EXIT_DRIFT, EXIT_FAILED = 0, 1, 2
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
    checks: dict[str, CheckResult] | None = None
    """Per check, what the run concluded (``reconciler.checks``); None until it completes."""

    @property
    def exit_code(self) -> int:
        return {"consistent": EXIT_CONSISTENT, "drift": EXIT_DRIFT}.get(self.outcome, EXIT_FAILED)

    @property
    def repaired_count(self) -> int:
        return sum(1 for f in self.findings if f.repaired)

    def count_checked(self, payments: int) -> None:
        """``payments`` more were compared (counted as they go: a stopped run says how far it
        got)."""
        self.payments_checked += payments

    def conclude(self, findings: list[Finding]) -> None:
        """The record phase's verdict: consistent when every finding was repaired."""
        self.findings = findings
        self.outcome = "consistent" if all(f.repaired for f in findings) else "drift"


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
            state = await asyncio.to_thread(
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
            lower = None if full else self._lower_bound(state.watermark)
            scope = _scope_of(lower)
            result.scope = scope.text
            result.watermark_from = None if full else state.watermark
            result.run_id = await asyncio.to_thread(
                records.start_run,
                self.read,
                mode=mode,
                dry_run=dry_run,
                watermark_from=result.watermark_from,
                started_at=started_at,
                scope=scope,
            )
            await self._run(result, lower, scope, state.verified, progress)
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
            await self._finish(result, new_watermark)
            self._observe(result, started_at)
        return result

    async def _finish(self, result: RunResult, new_watermark: str | None) -> None:
        """Record the end of the run (its own read-database transaction) and release the lock,
        storing ``new_watermark`` if given, and how far each check is verified after a
        completed, non-dry run (another). Independent: a failure to record must not keep the
        lock held or lose the watermark."""
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
                    checks=result.checks,
                )
            except FAILURES:
                log.exception("could not record the end of run %s", result.run_id)
        verified: Verified | None = None
        if result.checks is not None and result.outcome in records.COMPLETED and not result.dry_run:
            verified = {name: c.verified_up_to for name, c in result.checks.items()}
        try:
            await asyncio.to_thread(
                records.release_lock,
                self.read,
                self.owner,
                watermark=new_watermark,
                verified=verified,
            )
        except FAILURES:
            log.exception("could not release the reconciler lock; it lapses by itself")

    def _observe(self, result: RunResult, started_at: datetime) -> None:
        if self.metrics is not None:
            self.metrics.observe(result, started_at)

    def _lower_bound(self, watermark: str | None) -> uuid.UUID:
        """An incremental run's start in the id space: the watermark minus the safety margin
        (no watermark yet: the beginning)."""
        if watermark is None:
            return bound_at_ms(0)
        margin_ms = int(self.settings.reconcile_safety_margin_seconds * 1000)
        return bound_at_ms(timestamp_ms(uuid.UUID(watermark)) - margin_ms)

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
        verified: Verified,
        progress: ProgressCallback | None,
    ) -> None:
        """The phases of one run, in order: find, repair, verify, the ledger, then the outcome
        and what it concludes of each check (``verified``: how far each was verified before;
        recorded by ``run``). ``lower``: where an incremental run starts in the id space (None:
        a full audit). Each phase begins its own transactions (see its module); none spans
        phases."""
        ctx = RunContext(
            write=self.write,
            read=self.read,
            settings=self.settings,
            checkpoint=self._next_phase,
            sleep=self._sleep,
            pause_seconds=self._pause,
        )
        start = await asyncio.to_thread(find.look_around, ctx)
        result.watermark_to = str(start.upper)
        summing = verify.start_summing(ctx, lower, start)
        try:
            found = await find.find(
                ctx, lower=lower, start=start, counted=result.count_checked, progress=progress
            )
            ctx.checkpoint()
            findings = await find.confirm(ctx, found, start)
            repaired = await repair.repair(ctx, findings, found.orphans, dry_run=result.dry_run)
            totals_found = await verify.verify(
                ctx,
                scope=scope,
                lower=lower,
                start=start,
                summing=summing,
                repaired=repaired,
                dry_run=result.dry_run,
            )
        finally:
            # Never leave the thread's work behind the run (nor its error unread).
            if summing is not None:
                with contextlib.suppress(BaseException):
                    await summing
        ctx.checkpoint()
        of_wallets = await wallets.check(
            ctx, lower, start.outbox.in_flight, repaired.findings, dry_run=result.dry_run
        )
        settled = wallets.settle_flagged(repaired.findings, of_wallets)
        ctx.checkpoint()
        settled, of_campaigns = await campaigns.check(
            ctx, start.outbox.in_flight, settled, dry_run=result.dry_run
        )
        ctx.checkpoint()
        of_grants = await _grants(ctx, lower, start.upper, dry_run=result.dry_run)
        result.conclude(settled + totals_found + of_wallets + of_campaigns + of_grants)
        result.checks = checks.conclude(
            result.findings,
            before=verified,
            scope=scope,
            upper=_moment_of(start.upper),
            advance=not result.dry_run,
        )
        if repaired.unresolved:
            log.warning("%d payment(s) still differ after repair", len(repaired.unresolved))

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


async def _grants(
    ctx: RunContext, lower: uuid.UUID | None, upper: uuid.UUID, *, dry_run: bool
) -> list[Finding]:
    """The grants' findings: each campaign's budget against its grants in the write store, its
    figures on the read side, and the eligible payments and registrations without a grant."""
    states, _ = await asyncio.to_thread(ctx.in_write, campaigns.folds)
    found = await asyncio.to_thread(budgets.check, ctx, lower, states)
    found += await budgets.check_figures(ctx, upper, dry_run=dry_run)
    ctx.checkpoint()
    return found + await missing.check(ctx, lower, states, dry_run=dry_run)


def _scope_of(lower: uuid.UUID | None) -> Scope:
    """A run from ``lower`` on (None, or the very beginning: everything)."""
    if lower is None or lower == bound_at_ms(0):
        return Scope()
    return Scope(after=_moment_of(lower))


def _moment_of(bound: uuid.UUID) -> datetime:
    """The instant of a UUIDv7 bound."""
    return datetime.fromtimestamp(timestamp_ms(bound) / 1000, UTC)
