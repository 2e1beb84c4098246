"""Merchant totals checked against the fold of the write store's events, and rewritten from it.

A payment counts in the bucket (local day, local hour) of its capture, a refund in its own: the
events' ``occurred_at`` (the projector's rule: a payment row's ``created_at`` is its capture's
``occurred_at``), in the merchant's time zone (``merchants`` or the default).

The expected totals come from the events, never from the read rows they are meant to check: a
damaged row must not drag a right total with it. The write store sums them
(``reconciler.sums``); ``reconciler.buckets`` puts the sums in each merchant's local buckets.

Which events the totals should hold: those the projector has applied. Before the run's cut
(its upper bound minus the safety margin) they are the payments the run has just checked and
repaired; from the cut on, and for payments still in the outbox, events are read one by one and
each counts only if its payment's read row, read under the projector's locks with the totals,
is at its version or beyond.

A bucket is checked only if the run's scope covers it: every event it holds was recorded after
the scope's start (a full audit covers everything). An incremental run leaves the buckets that
began before its scope as they are, and reports those its repairs touched as unverified.

Nothing here begins a transaction: ``check_totals`` and ``compensate`` run in the caller's
(``reconciler.verify`` holds the projector's locks to rewrite, ``reconciler.repair`` to reset).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

from kessai.db import upsert, upsert_rows
from kessai.offsets import lock_offsets
from kessai.schema.read import (
    merchant_daily_totals,
    merchant_hourly_totals,
    merchants,
    payments,
    projector_offsets,
)
from reconciler.buckets import (
    COLUMNS,
    ZERO,
    Buckets,
    Expected,
    Stored,
    Sums,
    as_sums,
    diff,
    expected_from,
    local_hour,
)
from reconciler.records import Finding, Scope
from reconciler.sums import EventRow

__all__ = ["Expected", "expected_from"]


def lock_projector(conn: sa.Connection, topic: str) -> None:
    """Lock all of the topic's projector offset rows: the lock every projector batch takes
    first, so no batch interleaves with what this transaction reads and writes."""
    partitions = list(
        conn.execute(
            sa.select(projector_offsets.c.kafka_partition).where(projector_offsets.c.topic == topic)
        ).scalars()
    )
    lock_offsets(conn, topic, partitions)


def zone_lookup(conn: sa.Connection, default: str) -> dict[str, ZoneInfo]:
    zones: dict[str, ZoneInfo] = {}
    for merchant_id, name in conn.execute(
        sa.select(merchants.c.merchant_id, merchants.c.time_zone)
    ):
        try:
            zones[merchant_id] = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            zones[merchant_id] = ZoneInfo(default)
    return zones


def applied_versions(
    conn: sa.Connection, payment_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """The version each payment's read row is at (the projector applies a payment's events in
    order, so every event up to it has been counted)."""
    ordered = sorted(payment_ids)
    versions: dict[uuid.UUID, int] = {}
    for start in range(0, len(ordered), 1_000):
        chunk = ordered[start : start + 1_000]
        versions.update(
            (pid, int(v))
            for pid, v in conn.execute(
                sa.select(payments.c.payment_id, payments.c.version).where(
                    payments.c.payment_id.in_(chunk)
                )
            )
        )
    return versions


def _bucket_start_of_day(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), zone).astimezone(UTC)


def _bucket_start_of_hour(hour: datetime, zone: ZoneInfo) -> datetime:
    return hour.replace(tzinfo=zone).astimezone(UTC)


def check_totals(
    conn: sa.Connection,
    *,
    scope: Scope,
    expected: Expected,
    one_by_one: Iterable[EventRow],
    default_zone: str,
    repair: bool,
    skip_repair: Collection[str] = (),
    also: Mapping[str, Collection[date]] | None = None,
    merchants: Collection[str] | None = None,
    touched_merchants: Collection[str] = (),
    suspects: Collection[uuid.UUID] = (),
) -> list[Finding]:
    """Compare the stored totals with the events they count, for every bucket the ``scope``
    covers, and when ``repair``, overwrite the wrong ones (merchants in ``skip_repair`` are only
    reported: some of their payments are not applied yet).

    ``expected``: sums of events the projector has applied (the checked payments');
    ``one_by_one``: events that count only if their payment's read row, read here under the
    projector's locks, is at their version. ``also``: merchant days checked besides the scope's
    buckets (with their hours), whose events before the scope ``expected`` holds too.
    ``merchants``: only these (None: all; for an incremental run, those with events in the scope
    and ``touched_merchants``, whose rows a repair changed). Runs in the caller's transaction,
    which holds those locks to repair; without them, it compares one consistent snapshot, which
    a projector batch committing meanwhile may make differ where nothing is wrong (check again
    under the locks what differs).

    ``suspects``: payments whose read rows this run found wrong and did not repair. Their events
    in ``one_by_one`` cannot say whether the projector applied them (a missing row looks like
    one not applied yet), so the buckets that hold them are not judged: where they differ, they
    are reported ``totals_unverified`` and left as they are."""
    also = also or {}
    wanted = None if merchants is None else set(merchants)
    zones = zone_lookup(conn, default_zone)
    fallback = ZoneInfo(default_zone)
    if (zones, fallback) != (expected.zones, expected.fallback):
        expected = expected_from(expected.grouped, zones, fallback)  # a zone changed meanwhile
    want, undecided = _with_applied(
        conn, expected.buckets, one_by_one, wanted, zones, fallback, set(suspects)
    )
    readers: list[str] | None = None if wanted is None else sorted(wanted)
    if readers is None and scope.after is not None:
        # Only merchants with events in the scope (or rows a repair changed): the stored
        # buckets' key starts with the merchant, and there is no index by time alone.
        readers = sorted(want.keys() | also.keys() | set(touched_merchants))
    have = read_stored(conn, scope=scope, merchant_ids=readers, also=also)
    findings: list[Finding] = []
    for merchant_id in sorted(want.keys() | have.keys()):
        wrong_daily, wrong_hourly = _wrong(
            scope,
            want.get(merchant_id, Buckets()),
            have.get(merchant_id, Stored()),
            zones.get(merchant_id, fallback),
            also.get(merchant_id, ()),
        )
        open_days = _set_aside(wrong_daily, wrong_hourly, undecided.get(merchant_id, set()))
        findings += [_undecided(merchant_id, day, currency) for day, currency in open_days]
        fix = repair and merchant_id not in skip_repair
        findings += _findings(merchant_id, "daily_totals", "day", wrong_daily, fix)
        findings += _findings(merchant_id, "hourly_totals", "hour", wrong_hourly, fix)
        if fix:
            _rewrite(conn, merchant_daily_totals, "day", merchant_id, wrong_daily)
            _rewrite(conn, merchant_hourly_totals, "hour", merchant_id, wrong_hourly)
    return findings


Undecided = dict[str, set[tuple[datetime, str]]]
"""Per merchant, the (local hour, currency) buckets holding an event of a suspect payment."""


def _with_applied(
    conn: sa.Connection,
    prepared: Mapping[str, Buckets],
    one_by_one: Iterable[EventRow],
    wanted: set[str] | None,
    zones: Mapping[str, ZoneInfo],
    fallback: ZoneInfo,
    suspects: set[uuid.UUID],
) -> tuple[dict[str, Buckets], Undecided]:
    """The ``prepared`` buckets of the ``wanted`` merchants, with the events of ``one_by_one``
    whose payment's read row is at their version or beyond; and the buckets of the events of
    ``suspects``, which no read row can vouch for. ``prepared`` may serve a second look: the
    events go into copies."""
    buckets_of = {m: b for m, b in prepared.items() if wanted is None or m in wanted}
    singles = [e for e in one_by_one if wanted is None or e.merchant_id in wanted]
    versions = applied_versions(conn, {e.payment_id for e in singles})
    copied: set[str] = set()
    undecided: Undecided = {}
    for e in singles:
        if e.payment_id in suspects:
            hour, _day = local_hour(e.occurred_at, zones.get(e.merchant_id, fallback))
            undecided.setdefault(e.merchant_id, set()).add((hour, e.currency))
            continue
        if versions.get(e.payment_id, 0) < e.version:
            continue
        if e.merchant_id not in copied:
            copied.add(e.merchant_id)
            buckets_of[e.merchant_id] = buckets_of.get(e.merchant_id, Buckets()).copy()
        local = local_hour(e.occurred_at, zones.get(e.merchant_id, fallback))
        buckets_of[e.merchant_id].add(local, e.currency, e.index, e.amount, count=1)
    return buckets_of, undecided


def _set_aside(
    wrong_daily: DayDiff, wrong_hourly: HourDiff, undecided: set[tuple[datetime, str]]
) -> list[tuple[date, str]]:
    """Take the buckets ``undecided`` touches out of the wrong ones (in place): the (day,
    currency) of those that differed, to be reported unverified instead."""
    open_days: set[tuple[date, str]] = set()
    for hour, currency in undecided:
        if wrong_hourly.pop((hour, currency), None) is not None:
            open_days.add((hour.date(), currency))
        if wrong_daily.pop((hour.date(), currency), None) is not None:
            open_days.add((hour.date(), currency))
    return sorted(open_days)


def _undecided(merchant_id: str, day: date, currency: str) -> Finding:
    return Finding(
        kind="totals_unverified",
        merchant_id=merchant_id,
        details={
            "day": day.isoformat(),
            "currency": currency,
            "reason": "it counts a payment whose read row this run found wrong and did not "
            "repair, so whether that payment is in it cannot be told; checked again once the "
            "payment is repaired",
        },
    )


def read_stored(
    conn: sa.Connection,
    *,
    scope: Scope,
    merchant_ids: list[str] | None,
    also: Mapping[str, Collection[date]],
) -> dict[str, Stored]:
    """The stored buckets of ``merchant_ids`` (None: all) that ``scope`` may cover, and those of
    the days in ``also``."""
    d, h = merchant_daily_totals, merchant_hourly_totals
    daily_q = sa.select(d.c.merchant_id, d.c.day, d.c.currency, *(d.c[c] for c in COLUMNS))
    hourly_q = sa.select(h.c.merchant_id, h.c.hour, h.c.currency, *(h.c[c] for c in COLUMNS))
    if scope.after is not None:
        # Stored buckets that may be covered (local times are within 14 hours of UTC), and
        # the extra days.
        first = scope.after - timedelta(hours=14)
        days_too = sorted({day for days in also.values() for day in days})
        daily_q = daily_q.where(sa.or_(d.c.day >= first.date(), d.c.day.in_(days_too)))
        hourly_q = hourly_q.where(
            sa.or_(
                h.c.hour >= first.replace(tzinfo=None),
                *(
                    sa.and_(
                        h.c.hour >= datetime.combine(day, time()),
                        h.c.hour < datetime.combine(day + timedelta(days=1), time()),
                    )
                    for day in days_too
                ),
            )
        )
    stored: dict[str, Stored] = {}
    pages: list[list[str] | None] = [None]
    if merchant_ids is not None:
        pages = [merchant_ids[i : i + 1_000] for i in range(0, len(merchant_ids), 1_000)]
    for page in pages:
        daily_page, hourly_page = daily_q, hourly_q
        if page is not None:
            daily_page = daily_q.where(d.c.merchant_id.in_(page))
            hourly_page = hourly_q.where(h.c.merchant_id.in_(page))
        for merchant_id, day, currency, *sums in conn.execute(daily_page):
            have = stored.get(merchant_id) or stored.setdefault(merchant_id, Stored())
            have.daily[(day, currency)] = as_sums(sums)
        for merchant_id, hour, currency, *sums in conn.execute(hourly_page):
            have = stored.get(merchant_id) or stored.setdefault(merchant_id, Stored())
            have.hourly[(hour, currency)] = as_sums(sums)
    return stored


DayDiff = dict[tuple[date, str], tuple[Sums, Sums]]
HourDiff = dict[tuple[datetime, str], tuple[Sums, Sums]]


def _wrong(
    scope: Scope, want: Buckets, have: Stored, zone: ZoneInfo, extra: Collection[date]
) -> tuple[DayDiff, HourDiff]:
    """One merchant's wrong (day, hour) buckets among those ``scope`` covers, and the ``extra``
    days: (expected, stored) by bucket."""
    if scope.after is None:  # everything is covered
        return diff(want.daily, have.daily), diff(want.hourly, have.hourly)

    def day_covered(key: tuple[date, str]) -> bool:
        return key[0] in extra or scope.covers(_bucket_start_of_day(key[0], zone))

    def hour_covered(key: tuple[datetime, str]) -> bool:
        return key[0].date() in extra or scope.covers(_bucket_start_of_hour(key[0], zone))

    return (
        diff(
            {k: v for k, v in want.daily.items() if day_covered(k)},
            {k: v for k, v in have.daily.items() if day_covered(k)},
        ),
        diff(
            {k: v for k, v in want.hourly.items() if hour_covered(k)},
            {k: v for k, v in have.hourly.items() if hour_covered(k)},
        ),
    )


def _findings(
    merchant_id: str,
    kind: str,
    bucket: str,
    wrong: DayDiff | HourDiff,
    repaired: bool,
) -> list[Finding]:
    return [
        Finding(
            kind=kind,
            merchant_id=merchant_id,
            details={
                bucket: when.isoformat(),
                "currency": currency,
                "expected": dict(zip(COLUMNS, should, strict=True)),
                "actual": dict(zip(COLUMNS, was, strict=True)),
            },
            repaired=repaired,
        )
        for (when, currency), (should, was) in sorted(wrong.items())
    ]


EXTRA_DAYS_AT_MOST = 7
"""Merchant days before its scope that one run checks because its repairs changed rows there
(each costs a scan of that day's events); beyond these, they are reported unverified."""


def days_beyond(
    scope: Scope,
    touched: Mapping[str, Iterable[datetime]],
    zones: Mapping[str, ZoneInfo],
    fallback: ZoneInfo,
) -> dict[str, set[date]]:
    """The merchant days a repair changed rows in (``touched``: moments of those rows) that
    ``scope`` does not cover."""
    found: dict[str, set[date]] = {}
    for merchant_id, moments in touched.items():
        zone = zones.get(merchant_id, fallback)
        for day in {moment.astimezone(zone).date() for moment in moments}:
            if not scope.covers(_bucket_start_of_day(day, zone)):
                found.setdefault(merchant_id, set()).add(day)
    return found


def day_windows(
    days: Mapping[str, Collection[date]],
    zones: Mapping[str, ZoneInfo],
    fallback: ZoneInfo,
    *,
    slack: timedelta,
) -> list[tuple[datetime, datetime]]:
    """The UTC spans of those merchant days, widened by ``slack`` on both sides, overlapping ones
    merged (so each event is read once)."""
    spans = sorted(
        (
            _bucket_start_of_day(day, zone) - slack,
            _bucket_start_of_day(day + timedelta(days=1), zone) + slack,
        )
        for merchant_id, merchant_days in days.items()
        for zone in (zones.get(merchant_id, fallback),)
        for day in merchant_days
    )
    merged: list[tuple[datetime, datetime]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def unverified(scope: Scope, days: Mapping[str, Collection[date]]) -> list[Finding]:
    """Merchant days a repair changed rows in, before the scope, that the run did not check
    (more than ``EXTRA_DAYS_AT_MOST``): their totals were left as they were, and are not
    vouched for. A full audit checks them."""
    return [
        Finding(
            kind="totals_unverified",
            merchant_id=merchant_id,
            details={
                "day": day.isoformat(),
                "reason": f"the day began before the run's scope ({scope.text}); "
                "a full audit checks it",
            },
        )
        for merchant_id, merchant_days in sorted(days.items())
        for day in sorted(merchant_days)
    ]


def compensate(conn: sa.Connection, events: Iterable[EventRow], *, default_zone: str) -> None:
    """Take out of the totals what re-applying ``events`` will add back (payments whose read
    rows are removed so that the projector applies their whole history again): the totals end
    as they were, right or wrong, whatever the damaged rows said. Runs under the projector's
    locks, in the transaction that removes the rows."""
    zones = zone_lookup(conn, default_zone)
    fallback = ZoneInfo(default_zone)
    daily: dict[tuple[str, date, str], list[int]] = {}
    hourly: dict[tuple[str, datetime, str], list[int]] = {}
    for e in events:
        local = e.occurred_at.astimezone(zones.get(e.merchant_id, fallback))
        hour = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        for sums in (
            daily.setdefault((e.merchant_id, local.date(), e.currency), [0, 0, 0, 0]),
            hourly.setdefault((e.merchant_id, hour, e.currency), [0, 0, 0, 0]),
        ):
            sums[e.index] -= 1
            sums[e.index + 1] -= e.amount
    upsert_rows(
        conn, merchant_daily_totals, ("merchant_id", "day", "currency", *COLUMNS),
        [(*key, *sums) for key, sums in sorted(daily.items())], add=COLUMNS,
    )  # fmt: skip
    upsert_rows(
        conn, merchant_hourly_totals, ("merchant_id", "hour", "currency", *COLUMNS),
        [(*key, *sums) for key, sums in sorted(hourly.items())], add=COLUMNS,
    )  # fmt: skip


def _rewrite(
    conn: sa.Connection,
    table: sa.Table,
    bucket: str,
    merchant_id: str,
    wrong: Mapping[tuple[date, str], tuple[Sums, Sums]]
    | Mapping[tuple[datetime, str], tuple[Sums, Sums]],
) -> None:
    rows = []
    for (when, currency), (want, _have) in sorted(wrong.items()):
        if want == ZERO:
            conn.execute(
                table.delete().where(
                    table.c.merchant_id == merchant_id,
                    table.c[bucket] == when,
                    table.c.currency == currency,
                )
            )
        else:
            rows.append(
                {
                    "merchant_id": merchant_id,
                    bucket: when,
                    "currency": currency,
                    **dict(zip(COLUMNS, want, strict=True)),
                }
            )
    upsert(conn, table, rows, replace=COLUMNS)
