"""Phase 3 of a run, verify: the merchant totals against the events they count.

The scope's events before the run's cut are summed by the write store (``reconciler.sums``),
alongside the comparison of the payments where the databases allow it: the write store's events
never change, so the sums do not depend on what the other phases find. The totals are then
compared in two looks: a first without any lock (one read-database snapshot), and only for the
merchants that differ, a second in one read-database transaction that takes the projector's
offset locks first and, unless it is a dry run, rewrites the wrong buckets before it commits.
Guarantees: every bucket the scope covers, and the days before it that the repairs changed rows
in (at most ``totals.EXTRA_DAYS_AT_MOST``; the rest are reported ``totals_unverified``), equals
the events it counts, or is reported; a right total is never rewritten.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from datetime import date, datetime, timedelta

from kessai.ids import bound_at, bound_at_ms, timestamp_ms
from kessai.settings import Settings
from reconciler import sums, totals
from reconciler.context import RunContext
from reconciler.find import Start
from reconciler.records import Finding, Scope
from reconciler.repair import PAYMENT_KINDS, Repaired

EXTRA_SLACK = timedelta(minutes=1)
"""An event's id is taken right after its occurred_at: a day's events have ids within this of
the day's span."""


def cut_of(settings: Settings, lower: uuid.UUID | None, upper: uuid.UUID) -> uuid.UUID:
    """Where the totals stop trusting the checked payments: ``upper`` minus the safety margin
    (never below ``lower``). Events from the cut on are counted one by one, each only once its
    payment's read row shows it applied."""
    margin_ms = int(settings.reconcile_safety_margin_seconds * 1000)
    cut = bound_at_ms(timestamp_ms(upper) - margin_ms)
    return cut if lower is None else max(cut, lower)


def sum_scope(ctx: RunContext, lower: uuid.UUID | None, start: Start) -> totals.Expected:
    """The scope's events before the cut, summed by the write store (one read on one
    connection, no lock: the write store's events never change), in each merchant's local
    buckets."""
    cut = cut_of(ctx.settings, lower, start.upper)
    if lower is not None and lower == bound_at_ms(0):
        lower = None  # the very beginning: no bound to read the index by
    with ctx.write.connect() as wconn:
        grouped = sums.sum_events(wconn, lower=lower, below=cut, leave_out=start.outbox.in_flight)
    return totals.expected_from(grouped, start.zones, start.fallback)


def start_summing(
    ctx: RunContext, lower: uuid.UUID | None, start: Start
) -> asyncio.Task[totals.Expected] | None:
    """``sum_scope`` in a thread, alongside the other phases (None on SQLite: later, alone)."""
    if not ctx.parallel:
        return None
    return asyncio.create_task(asyncio.to_thread(sum_scope, ctx, lower, start))


async def verify(
    ctx: RunContext,
    *,
    scope: Scope,
    lower: uuid.UUID | None,
    start: Start,
    summing: asyncio.Task[totals.Expected] | None,
    repaired: Repaired,
    dry_run: bool,
) -> list[Finding]:
    """The totals' findings: wrong buckets (rewritten unless ``dry_run``) and the days left
    unverified."""
    if summing is not None:
        expected = await summing
    else:
        expected = await asyncio.to_thread(sum_scope, ctx, lower, start)
    still_wrong = [f for f in repaired.findings if f.kind in PAYMENT_KINDS and not f.repaired]
    # Merchants with payments still wrong are only reported: their rows are not all applied.
    skip = set() if dry_run else {f.merchant_id for f in still_wrong if f.merchant_id}
    # Those payments (all of them in a dry run): their latest events cannot be told applied or
    # not, so the buckets holding them are not judged.
    suspects = {f.payment_id for f in still_wrong if f.payment_id is not None}
    extra, left = _days_to_check(scope, repaired, start)
    ctx.checkpoint()
    found = await asyncio.to_thread(
        check_totals,
        ctx,
        scope=scope,
        lower=lower,
        cut=cut_of(ctx.settings, lower, start.upper),
        expected=expected,
        in_flight=start.outbox.in_flight,
        repair=not dry_run,
        skip=skip,
        extra_days=extra,
        extra_windows=totals.day_windows(extra, start.zones, start.fallback, slack=EXTRA_SLACK),
        touched_merchants=set(repaired.touched),
        suspects=suspects,
    )
    return found + totals.unverified(scope, left)


def _days_to_check(
    scope: Scope, repaired: Repaired, start: Start
) -> tuple[dict[str, set[date]], dict[str, set[date]]]:
    """The days the repairs changed rows in, before the scope: the first few are checked too
    (their events read from the day's start), the rest (second value) reported unverified."""
    beyond = totals.days_beyond(scope, repaired.touched, start.zones, start.fallback)
    extra: dict[str, set[date]] = {}
    left: dict[str, set[date]] = {}
    for merchant_id, day in sorted((m, d) for m, ds in beyond.items() for d in ds):
        taken = sum(len(ds) for ds in extra.values()) < totals.EXTRA_DAYS_AT_MOST
        (extra if taken else left).setdefault(merchant_id, set()).add(day)
    return extra, left


def check_totals(
    ctx: RunContext,
    *,
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
    suspects: set[uuid.UUID],
) -> list[Finding]:
    """The totals of every bucket ``scope`` covers against the events they count. ``expected``:
    the scope's events before the ``cut``; the few after it are read under the projector's
    locks, with the totals. Transactions: the first look reads without one; the second look,
    only if the first found something, is one read-database transaction holding the projector's
    locks, in which wrong buckets are rewritten."""
    with ctx.write.connect() as wconn:
        # ``extra_days``' events before the scope: each day's span of ids (widened for ids
        # taken just after their occurred_at); no span reaches into the scope.
        for start, end in extra_windows:
            if lower is None:
                break
            first, below = bound_at(start), min(bound_at(end), lower)
            if first < below:
                more = sums.sum_events(wconn, lower=first, below=below, leave_out=in_flight)
                expected = totals.expected_from(
                    expected.grouped + more, expected.zones, expected.fallback
                )
    check = functools.partial(
        totals.check_totals,
        scope=scope,
        expected=expected,
        default_zone=ctx.settings.default_merchant_time_zone,
        skip_repair=skip,
        also=extra_days,
        touched_merchants=touched_merchants,
        suspects=suspects,
    )
    with ctx.read.connect() as rconn, ctx.write.connect() as wconn:
        singles = sums.events_one_by_one(wconn, since=cut, payment_ids=in_flight)
        first_look = check(rconn, one_by_one=singles, repair=False)
    differ = {f.merchant_id for f in first_look if f.merchant_id is not None}
    if not differ:
        return []
    with ctx.read.begin() as rconn, ctx.write.connect() as wconn:
        totals.lock_projector(rconn, ctx.settings.topic)
        singles = sums.events_one_by_one(wconn, since=cut, payment_ids=in_flight)
        return check(rconn, one_by_one=singles, repair=repair, merchants=differ)
