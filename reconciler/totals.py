"""Merchant totals checked against the fold of the write store's events, and rewritten from it.

A payment counts in the bucket (local day, local hour) of its capture, a refund in its own: the
events' ``occurred_at`` (the projector's rule: a payment row's ``created_at`` is its capture's
``occurred_at``), in the merchant's time zone (``merchants`` or the default).

The expected totals come from the events, never from the read rows they are meant to check: a
damaged row must not drag a right total with it. The write store has its primary key and the
unique ``event_id`` (UUIDv7, time-ordered), so a span of time is a range of that index, which
the database reads once and answers summed per (merchant, currency, UTC quarter hour, type):
one row per group. Every zone's offset is a whole number of quarter hours, so each UTC quarter
hour falls in one local hour. Cost: a range scan of the scope's events (a full audit: all of
them), inside the write database; what crosses the wire grows with merchants and hours, not
with events.

Which events the totals should hold: those the projector has applied. Before the run's cut
(its upper bound minus the safety margin) they are the payments the run has just checked and
repaired; from the cut on, and for payments still in the outbox, events are read one by one and
each counts only if its payment's read row, read under the projector's locks with the totals,
is at its version or beyond.

A bucket is checked only if the run's scope covers it: every event it holds was recorded after
the scope's start (a full audit covers everything). An incremental run leaves the buckets that
began before its scope as they are, and reports those its repairs touched as unverified.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

from kessai.clock import as_utc
from kessai.db import upsert, upsert_rows
from kessai.offsets import lock_offsets
from kessai.schema import write
from kessai.schema.read import (
    merchant_daily_totals,
    merchant_hourly_totals,
    merchants,
    payments,
    projector_offsets,
)
from reconciler.records import Finding, Scope

Sums = tuple[int, int, int, int]
K = TypeVar("K")
ZERO: Sums = (0, 0, 0, 0)
COLUMNS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")


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


LocalHour = tuple[datetime, date]
"""A bucket's local hour (naive) and local day."""


def local_hour(moment: datetime, zone: ZoneInfo) -> LocalHour:
    """The local hour (naive) and day of ``moment`` in ``zone``."""
    local = moment.astimezone(zone).replace(minute=0, second=0, microsecond=0, tzinfo=None)
    return local, local.date()


@dataclass(slots=True)
class _Buckets:
    daily: dict[tuple[date, str], list[int]] = field(default_factory=dict)
    hourly: dict[tuple[datetime, str], list[int]] = field(default_factory=dict)

    def add(self, local: LocalHour, currency: str, index: int, amount: int, *, count: int) -> None:
        """Count ``count`` events of ``amount`` in all (``index`` 0: captures, 2: refunds) in
        the local hour and day ``local``."""
        hour, day = local
        day_sums = self.daily.get((day, currency))
        if day_sums is None:
            day_sums = self.daily[(day, currency)] = [0, 0, 0, 0]
        hour_sums = self.hourly.get((hour, currency))
        if hour_sums is None:
            hour_sums = self.hourly[(hour, currency)] = [0, 0, 0, 0]
        day_sums[index] += count
        day_sums[index + 1] += amount
        hour_sums[index] += count
        hour_sums[index + 1] += amount

    def copy(self) -> _Buckets:
        return _Buckets(
            {key: list(sums) for key, sums in self.daily.items()},
            {key: list(sums) for key, sums in self.hourly.items()},
        )


@dataclass(frozen=True, slots=True)
class Expected:
    """What the grouped sums of events say each merchant's totals hold, in its local buckets
    (built once, alongside the comparison of the payments, and used by both looks)."""

    grouped: list[GroupedRow]
    zones: dict[str, ZoneInfo]
    fallback: ZoneInfo
    buckets: dict[str, _Buckets]


def expected_from(
    grouped: list[GroupedRow], zones: dict[str, ZoneInfo], fallback: ZoneInfo
) -> Expected:
    """The local buckets of ``grouped`` (merchant zones: ``zones``, else ``fallback``)."""
    buckets_of: dict[str, _Buckets] = {}
    # The grouped sums repeat the same quarter hours for many merchants of a zone: each
    # quarter hour is converted to local time once per zone.
    local_of: dict[tuple[ZoneInfo, int], LocalHour] = {}
    for merchant_id, currency, quarter, index, n, amount in grouped:
        zone = zones.get(merchant_id, fallback)
        local = local_of.get((zone, quarter))
        if local is None:
            local = local_of[(zone, quarter)] = local_hour(quarter_start(quarter), zone)
        buckets = buckets_of.get(merchant_id)
        if buckets is None:
            buckets = buckets_of[merchant_id] = _Buckets()
        buckets.add(local, currency, index, amount, count=n)
    return Expected(grouped, zones, fallback, buckets_of)


@dataclass(frozen=True, slots=True)
class EventRow:
    """What a totals bucket needs of one event (a typed-column read, no body)."""

    payment_id: uuid.UUID
    version: int
    merchant_id: str
    index: int
    """0: a capture (payments count and amount); 2: a refund."""
    amount: int
    currency: str
    occurred_at: datetime


def _index(event_type: str) -> int:
    return 0 if event_type == "PaymentCaptured" else 2


def _quarter_of(conn: sa.Connection, column: sa.ColumnElement[datetime]) -> sa.ColumnElement[int]:
    """The UTC quarter hour of a stored naive UTC time, as a whole number (quarter hours since
    1970): a number, not text, so the database groups on a small key. Every zone's offset is a
    whole number of quarter hours, so a UTC quarter hour lies within one local hour."""
    # Constants as literals: the expression is repeated in GROUP BY, where a bound parameter
    # would make it a different expression.
    if conn.dialect.name == "sqlite":
        seconds = sa.func.strftime(sa.literal_column("'%s'"), column)
        return sa.cast(seconds, sa.Integer).op("/")(sa.literal_column("900"))
    minutes = sa.func.timestampdiff(
        sa.literal_column("MINUTE"), sa.literal_column("'1970-01-01'"), column
    )
    return minutes.op("DIV")(sa.literal_column("15"))


GroupedRow = tuple[str, str, int, int, int, int]
"""(merchant_id, currency, UTC quarter hour (quarter hours since 1970), index, events, amount)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TEMP_TABLE_BYTES = 256 * 1024 * 1024
"""The in-memory temporary table of the grouping, per session, while it runs: with MariaDB's
default 16 MiB, a million events' groups spill to disk (docs/BENCHMARKS.md)."""


def quarter_start(quarter: int) -> datetime:
    """The UTC start of a quarter hour numbered as in ``GroupedRow``."""
    return _EPOCH + timedelta(minutes=15 * quarter)


@contextlib.contextmanager
def _roomy_temp_tables(conn: sa.Connection) -> Iterator[None]:
    """Raise the session's in-memory temporary table size for one statement (MySQL/MariaDB),
    and put it back: the connection returns to the pool as it came."""
    if conn.dialect.name != "mysql":
        yield
        return
    before = conn.exec_driver_sql(
        "SELECT @@SESSION.tmp_table_size, @@SESSION.max_heap_table_size"
    ).one()
    conn.exec_driver_sql(
        "SET SESSION tmp_table_size = %s, max_heap_table_size = %s",
        (max(int(before[0]), _TEMP_TABLE_BYTES), max(int(before[1]), _TEMP_TABLE_BYTES)),
    )
    try:
        yield
    finally:
        conn.exec_driver_sql(
            "SET SESSION tmp_table_size = %s, max_heap_table_size = %s",
            (int(before[0]), int(before[1])),
        )


def sum_events(
    conn: sa.Connection,
    *,
    lower: uuid.UUID | None,
    below: uuid.UUID,
    leave_out: Collection[uuid.UUID] = (),
) -> list[GroupedRow]:
    """The write store's events with ``lower <= event_id < below``, summed by the database per
    (merchant, currency, UTC quarter hour, type): one range of the ``event_id`` index, one row
    per group back. ``leave_out``: payments counted one event at a time instead."""
    e = write.events.c
    quarter = _quarter_of(conn, e.occurred_at).label("quarter")
    captured = sa.case((e.event_type == "PaymentCaptured", 0), else_=2).label("kind")
    query = sa.select(
        e.merchant_id, e.currency, quarter, captured, sa.func.count(), sa.func.sum(e.amount)
    ).where(e.event_id < below)
    if lower is not None:
        query = query.where(e.event_id >= lower)
    if leave_out:
        query = query.where(e.payment_id.not_in(sorted(leave_out)))
    # ORDER BY NULL: MariaDB would otherwise sort the groups, which nothing here needs.
    query = query.group_by(e.merchant_id, e.currency, quarter, captured).order_by(sa.null())
    with _roomy_temp_tables(conn):
        return [
            (merchant_id, currency, int(q), int(index), int(n), int(amount or 0))
            for merchant_id, currency, q, index, n, amount in conn.execute(query)
        ]


def events_one_by_one(
    conn: sa.Connection, *, since: uuid.UUID | None, payment_ids: Collection[uuid.UUID] = ()
) -> list[EventRow]:
    """Events with ``event_id >= since`` (the run's last moments: few; None: none), and every
    event of ``payment_ids`` (primary-key lookups, 1,000 payments a query)."""
    e = write.events.c
    columns = (
        e.payment_id, e.version, e.merchant_id, e.event_type, e.amount, e.currency, e.occurred_at
    )  # fmt: skip
    queries = [] if since is None else [sa.select(*columns).where(e.event_id >= since)]
    ordered = sorted(payment_ids)
    for start in range(0, len(ordered), 1_000):
        chunk = ordered[start : start + 1_000]
        queries.append(sa.select(*columns).where(e.payment_id.in_(chunk)))
    found: dict[tuple[uuid.UUID, int], EventRow] = {}
    for query in queries:
        for pid, v, m, t, a, c, at in conn.execute(query):
            found[(pid, int(v))] = EventRow(pid, int(v), m, _index(t), int(a), c, as_utc(at))
    return [found[key] for key in sorted(found)]


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
) -> list[Finding]:
    """Compare the stored totals with the events they count, for every bucket the ``scope``
    covers, and when ``repair``, overwrite the wrong ones (merchants in ``skip_repair`` are only
    reported: some of their payments are not applied yet).

    ``expected``: sums of events the projector has applied (the checked payments'); ``one_by_one``:
    events that count only if their payment's read row, read here under the projector's locks,
    is at their version. ``also``: merchant days checked besides the scope's buckets (with their
    hours), whose events before the scope ``expected`` holds too. ``merchants``: only these (None:
    all; for an incremental run, those with events in the scope and ``touched_merchants``,
    whose rows a repair changed). Runs in the caller's transaction, which holds those locks to
    repair; without them, it compares one consistent snapshot, which a projector batch
    committing meanwhile may make differ where nothing is wrong (check again under the locks
    what differs)."""
    also = also or {}
    wanted = None if merchants is None else set(merchants)
    zones = zone_lookup(conn, default_zone)
    fallback = ZoneInfo(default_zone)
    if (zones, fallback) != (expected.zones, expected.fallback):
        expected = expected_from(expected.grouped, zones, fallback)  # a zone changed meanwhile
    buckets_of = expected.buckets
    if wanted is not None:
        buckets_of = {m: b for m, b in buckets_of.items() if m in wanted}
    singles = [e for e in one_by_one if wanted is None or e.merchant_id in wanted]
    versions = applied_versions(conn, {e.payment_id for e in singles})
    # The prepared buckets may serve a second look: the singles go into copies.
    copied: set[str] = set()
    for e in singles:
        if versions.get(e.payment_id, 0) >= e.version:
            if not copied:
                buckets_of = dict(buckets_of)
            if e.merchant_id not in copied:
                copied.add(e.merchant_id)
                buckets_of[e.merchant_id] = buckets_of.get(e.merchant_id, _Buckets()).copy()
            local = local_hour(e.occurred_at, zones.get(e.merchant_id, fallback))
            buckets_of[e.merchant_id].add(local, e.currency, e.index, e.amount, count=1)
    expected_buckets = buckets_of

    d, h = merchant_daily_totals, merchant_hourly_totals
    daily_q = sa.select(d.c.merchant_id, d.c.day, d.c.currency, *(d.c[c] for c in COLUMNS))
    hourly_q = sa.select(h.c.merchant_id, h.c.hour, h.c.currency, *(h.c[c] for c in COLUMNS))
    readers: list[str] | None = None if wanted is None else sorted(wanted)
    if readers is None and scope.after is not None:
        # Only merchants with events in the scope (or rows a repair changed): the stored
        # buckets' key starts with the merchant, and there is no index by time alone.
        readers = sorted(expected_buckets.keys() | also.keys() | set(touched_merchants))
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
    stored: dict[str, _Stored] = {}
    pages = (
        [None]
        if readers is None
        else [readers[i : i + 1_000] for i in range(0, len(readers), 1_000)]
    )
    for page in pages:
        daily_page, hourly_page = daily_q, hourly_q
        if page is not None:
            daily_page = daily_q.where(d.c.merchant_id.in_(page))
            hourly_page = hourly_q.where(h.c.merchant_id.in_(page))
        for merchant_id, day, currency, *sums in conn.execute(daily_page):
            have = stored.get(merchant_id) or stored.setdefault(merchant_id, _Stored())
            have.daily[(day, currency)] = _as_sums(sums)
        for merchant_id, hour, currency, *sums in conn.execute(hourly_page):
            have = stored.get(merchant_id) or stored.setdefault(merchant_id, _Stored())
            have.hourly[(hour, currency)] = _as_sums(sums)

    findings: list[Finding] = []
    for merchant_id in sorted(expected_buckets.keys() | stored.keys()):
        zone = zones.get(merchant_id, fallback)
        want = expected_buckets.get(merchant_id, _Buckets())
        have = stored.get(merchant_id, _Stored())

        extra = also.get(merchant_id, ())

        def day_covered(
            key: tuple[date, str], zone: ZoneInfo = zone, extra: Collection[date] = extra
        ) -> bool:
            return (
                scope.after is None
                or key[0] in extra
                or scope.covers(_bucket_start_of_day(key[0], zone))
            )

        def hour_covered(
            key: tuple[datetime, str], zone: ZoneInfo = zone, extra: Collection[date] = extra
        ) -> bool:
            return (
                scope.after is None
                or key[0].date() in extra
                or scope.covers(_bucket_start_of_hour(key[0], zone))
            )

        if scope.after is None:  # everything is covered
            wrong_daily = _diff(want.daily, have.daily)
            wrong_hourly = _diff(want.hourly, have.hourly)
        else:
            wrong_daily = _diff(
                {k: v for k, v in want.daily.items() if day_covered(k)},
                {k: v for k, v in have.daily.items() if day_covered(k)},
            )
            wrong_hourly = _diff(
                {k: v for k, v in want.hourly.items() if hour_covered(k)},
                {k: v for k, v in have.hourly.items() if hour_covered(k)},
            )
        fix = repair and merchant_id not in skip_repair
        for kind, wrong, bucket in (
            ("daily_totals", wrong_daily, "day"),
            ("hourly_totals", wrong_hourly, "hour"),
        ):
            for (when, currency), (should, was) in sorted(wrong.items()):
                findings.append(
                    Finding(
                        kind=kind,
                        merchant_id=merchant_id,
                        details={
                            bucket: when.isoformat(),
                            "currency": currency,
                            "expected": dict(zip(COLUMNS, should, strict=True)),
                            "actual": dict(zip(COLUMNS, was, strict=True)),
                        },
                        repaired=fix,
                    )
                )
        if fix:
            _rewrite(conn, merchant_daily_totals, "day", merchant_id, wrong_daily)
            _rewrite(conn, merchant_hourly_totals, "hour", merchant_id, wrong_hourly)
    return findings


@dataclass(slots=True)
class _Stored:
    daily: dict[tuple[date, str], Sums] = field(default_factory=dict)
    hourly: dict[tuple[datetime, str], Sums] = field(default_factory=dict)


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


def _as_sums(values: Sequence[int]) -> Sums:
    return (int(values[0]), int(values[1]), int(values[2]), int(values[3]))


def _diff(
    expected: Mapping[K, Sequence[int]], stored: Mapping[K, Sums]
) -> dict[K, tuple[Sums, Sums]]:
    wrong: dict[K, tuple[Sums, Sums]] = {}
    for key, sums in expected.items():
        want, have = _as_sums(sums), stored.get(key, ZERO)
        if want != have:
            wrong[key] = (want, have)
    for key in stored.keys() - expected.keys():
        if stored[key] != ZERO:
            wrong[key] = (ZERO, stored[key])
    return wrong


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
