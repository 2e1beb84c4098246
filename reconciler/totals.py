"""Merchant totals checked against the rows they sum, and rewritten from them when wrong.

A payment counts in the bucket (local day, local hour) of its creation, a refund in its own, in
the merchant's time zone (``merchants`` or the default). Everything here runs inside one
read-DB transaction that first locks every projector offset row of the topic: no projector
batch can commit between reading the rows and rewriting the totals.

Checked merchant by merchant, through the ``(merchant_id, created_at)`` index: a row lookup per
payment, and four queries per merchant. When most of the stored days of the merchants are to
be checked (a full audit, an incremental run over a long backlog), a first pass decides which
merchants, and which of their days, need that at all: the database sums the rows per
(merchant, currency, UTC hour) in one pass over each table, those sums are put in local hours
and days here and fingerprinted (count and sum of CRC32s per merchant), and compared with the
same fingerprint of the stored buckets, which the database computes; for merchants that
differ, again per day. Only the days that differ are checked (and repaired) as before. UTC
hours are exact local hours wherever the zone's offset is a whole number of hours; a merchant
in any other zone is checked as before.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

from kessai.db import upsert
from kessai.ids import timestamp_ms
from kessai.offsets import lock_offsets
from kessai.schema.read import (
    merchant_daily_totals,
    merchant_hourly_totals,
    merchants,
    payments,
    projector_offsets,
    refunds,
)
from reconciler.compare import crc32, enable_crc32
from reconciler.records import Finding

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


@dataclass(slots=True)
class _Buckets:
    daily: dict[tuple[date, str], list[int]] = field(default_factory=dict)
    hourly: dict[tuple[datetime, str], list[int]] = field(default_factory=dict)

    def add(self, local: datetime, currency: str, index: int, amount: int) -> None:
        hour = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        day_sums = self.daily.setdefault((local.date(), currency), [0, 0, 0, 0])
        hour_sums = self.hourly.setdefault((hour, currency), [0, 0, 0, 0])
        for sums in (day_sums, hour_sums):
            sums[index] += 1
            sums[index + 1] += amount


def _window(days: Iterable[date], zone: ZoneInfo) -> tuple[datetime, datetime]:
    ordered = sorted(days)
    start = datetime.combine(ordered[0], time(), zone).astimezone(UTC)
    end = datetime.combine(ordered[-1] + timedelta(days=1), time(), zone).astimezone(UTC)
    return start, end


def check_totals(
    conn: sa.Connection,
    scope: dict[str, set[date]] | None,
    *,
    default_zone: str,
    repair: bool,
    skip_repair: Collection[str] = (),
) -> list[Finding]:
    """Compare totals with their rows for ``scope`` (merchant -> local days; None: all) and,
    when ``repair``, overwrite wrong buckets from the rows (merchants in ``skip_repair`` are
    only reported: their rows themselves are not right yet)."""
    zones = zone_lookup(conn, default_zone)
    fallback = ZoneInfo(default_zone)
    if scope is None:
        merchant_ids = set(conn.execute(sa.select(payments.c.merchant_id).distinct()).scalars())
        merchant_ids |= set(
            conn.execute(sa.select(merchant_daily_totals.c.merchant_id).distinct()).scalars()
        )
        merchant_ids |= set(
            conn.execute(sa.select(merchant_hourly_totals.c.merchant_id).distinct()).scalars()
        )
        plan: dict[str, set[date] | None] = dict.fromkeys(sorted(merchant_ids))
    else:
        plan = {m: days for m, days in sorted(scope.items()) if days}
    if plan and _worth_a_first_pass(conn, plan):
        plan = _first_pass(conn, plan, zones, fallback)
    findings: list[Finding] = []
    for merchant_id, days in plan.items():
        zone = zones.get(merchant_id, fallback)
        findings += _check_merchant(
            conn, merchant_id, days, zone, repair=repair and merchant_id not in skip_repair
        )
    return findings


def _check_merchant(
    conn: sa.Connection, merchant_id: str, days: set[date] | None, zone: ZoneInfo, *, repair: bool
) -> list[Finding]:
    expected = _Buckets()
    p, r = payments.c, refunds.c
    pay_q = sa.select(p.created_at, p.currency, p.captured_amount).where(
        p.merchant_id == merchant_id
    )
    ref_q = (
        sa.select(r.created_at, r.currency, r.amount)
        .select_from(refunds.join(payments, payments.c.payment_id == r.payment_id))
        .where(p.merchant_id == merchant_id)
    )
    daily_q = sa.select(merchant_daily_totals).where(
        merchant_daily_totals.c.merchant_id == merchant_id
    )
    hourly_q = sa.select(merchant_hourly_totals).where(
        merchant_hourly_totals.c.merchant_id == merchant_id
    )
    if days is not None:
        start, end = _window(days, zone)
        pay_q = pay_q.where(p.created_at >= start, p.created_at < end)
        ref_q = ref_q.where(p.created_at < end, r.created_at >= start, r.created_at < end)
        first, last = min(days), max(days)
        daily_q = daily_q.where(
            merchant_daily_totals.c.day >= first, merchant_daily_totals.c.day <= last
        )
        hourly_q = hourly_q.where(
            merchant_hourly_totals.c.hour >= datetime.combine(first, time()),
            merchant_hourly_totals.c.hour < datetime.combine(last + timedelta(days=1), time()),
        )
    for created_at, currency, amount in conn.execute(pay_q):
        expected.add(created_at.astimezone(zone), currency, 0, int(amount))
    for created_at, currency, amount in conn.execute(ref_q):
        expected.add(created_at.astimezone(zone), currency, 2, int(amount))

    def in_scope(day: date) -> bool:
        return days is None or day in days

    stored_daily: dict[tuple[date, str], Sums] = {
        (row.day, row.currency): _sums(row) for row in conn.execute(daily_q)
    }
    stored_hourly: dict[tuple[datetime, str], Sums] = {
        (row.hour, row.currency): _sums(row) for row in conn.execute(hourly_q)
    }
    findings: list[Finding] = []
    wrong_daily = _diff(
        {k: _as_sums(v) for k, v in expected.daily.items() if in_scope(k[0])},
        {k: v for k, v in stored_daily.items() if in_scope(k[0])},
    )
    wrong_hourly = _diff(
        {k: _as_sums(v) for k, v in expected.hourly.items() if in_scope(k[0].date())},
        {k: v for k, v in stored_hourly.items() if in_scope(k[0].date())},
    )
    for kind, wrong, bucket in (
        ("daily_totals", wrong_daily, "day"),
        ("hourly_totals", wrong_hourly, "hour"),
    ):
        for (when, currency), (want, have) in sorted(wrong.items()):
            findings.append(
                Finding(
                    kind=kind,
                    merchant_id=merchant_id,
                    details={
                        bucket: when.isoformat(),
                        "currency": currency,
                        "expected": dict(zip(COLUMNS, want, strict=True)),
                        "actual": dict(zip(COLUMNS, have, strict=True)),
                    },
                    repaired=repair,
                )
            )
    if repair:
        _rewrite(conn, merchant_daily_totals, "day", merchant_id, wrong_daily)
        _rewrite(conn, merchant_hourly_totals, "hour", merchant_id, wrong_hourly)
    return findings


def _sums(row: sa.Row[object]) -> Sums:
    m = row._mapping
    return (
        int(m["payments_count"]),
        int(m["payments_amount"]),
        int(m["refunds_count"]),
        int(m["refunds_amount"]),
    )


def _as_sums(values: list[int]) -> Sums:
    return (values[0], values[1], values[2], values[3])


def _diff(expected: Mapping[K, Sums], stored: Mapping[K, Sums]) -> dict[K, tuple[Sums, Sums]]:
    wrong: dict[K, tuple[Sums, Sums]] = {}
    for key in expected.keys() | stored.keys():
        want, have = expected.get(key, ZERO), stored.get(key, ZERO)
        if want != have:
            wrong[key] = (want, have)
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


# -- the first pass: fingerprints of many merchants at once ------------------------------------

GROUPING_MEMORY = 256 * 1024 * 1024
FIRST_PASS_MIN_DENSITY = 0.25
"""The first pass reads every row of the tables (there is no index by time alone), the
per-merchant check only the scope's rows, each through an index entry and a row lookup. So the
first pass is taken for a full check, or when the scope fills at least this share of the
(merchant, day) cells from its earliest to its latest day, and that window is at least this
share of the time the read database's payments span (their ids are UUIDv7: the first and last
id say when)."""


def _worth_a_first_pass(conn: sa.Connection, plan: Mapping[str, set[date] | None]) -> bool:
    if any(days is None for days in plan.values()):
        return True
    days = [day for ds in plan.values() if ds for day in ds]
    window = (max(days) - min(days)).days + 1
    if len(days) < FIRST_PASS_MIN_DENSITY * window * len(plan):
        return False
    first, last = conn.execute(
        sa.select(sa.func.min(payments.c.payment_id), sa.func.max(payments.c.payment_id))
    ).one()
    if first is None or last is None:
        return True
    stored = [uuid.UUID(bytes=v) if isinstance(v, bytes) else v for v in (first, last)]
    span = (timestamp_ms(stored[1]) - timestamp_ms(stored[0])) / 86_400_000 + 1
    return window >= FIRST_PASS_MIN_DENSITY * span


def _utc_hour(column: sa.ColumnElement[datetime]) -> sa.ColumnElement[str]:
    """``YYYY-MM-DD HH`` of a stored (naive UTC) time, as text on MySQL and SQLite alike."""
    return sa.func.substr(sa.cast(column, sa.String), 1, 13)


@lru_cache(maxsize=65_536)
def _local_hour(hour: str, zone: ZoneInfo) -> datetime | None:
    """The naive local hour that the UTC hour ``YYYY-MM-DD HH`` is in ``zone``; None when the
    zone's offset then is not a whole number of hours (the hour is split between two)."""
    start = datetime(int(hour[0:4]), int(hour[5:7]), int(hour[8:10]), int(hour[11:13]), tzinfo=UTC)
    local = start.astimezone(zone)
    if local.minute or local.second:
        return None
    return local.replace(tzinfo=None)


def _bucket_text(columns: sa.ColumnCollection[str, sa.Column[object]], length: int) -> list[object]:
    when = columns["day"] if "day" in columns else columns["hour"]
    return [
        sa.func.substr(sa.cast(when, sa.String), 1, length),
        columns["currency"],
        *(columns[c] for c in COLUMNS),
    ]


def _stored_fingerprints(
    conn: sa.Connection, table: sa.Table, length: int, where: list[sa.ColumnElement[bool]]
) -> dict[str, tuple[int, int]]:
    """Per merchant: (buckets, sum of their CRC32s) of the stored buckets."""
    c = table.c
    query = sa.select(c.merchant_id, sa.func.count(), sa.func.sum(crc32(*_bucket_text(c, length))))
    rows = conn.execute(query.where(*where).group_by(c.merchant_id))
    return {m: (int(n), int(crc or 0)) for m, n, crc in rows}


def _stored_day_fingerprints(
    conn: sa.Connection,
    table: sa.Table,
    length: int,
    where: list[sa.ColumnElement[bool]],
    merchant_ids: Collection[str],
) -> dict[tuple[str, date], tuple[int, int]]:
    """Per (merchant, local day), for some merchants: (buckets, sum of their CRC32s)."""
    c = table.c
    day = sa.func.substr(sa.cast(c.day if "day" in c else c.hour, sa.String), 1, 10)
    query = sa.select(
        c.merchant_id, day, sa.func.count(), sa.func.sum(crc32(*_bucket_text(c, length)))
    ).where(*where, c.merchant_id.in_(sorted(merchant_ids)))
    rows = conn.execute(query.group_by(c.merchant_id, day))
    return {(m, date.fromisoformat(str(d))): (int(n), int(crc or 0)) for m, d, n, crc in rows}


def _crc_of(when: date, currency: str, sums: list[int], *, hourly: bool) -> int:
    text = f"{when:%Y-%m-%d %H}" if hourly else when.isoformat()
    return zlib.crc32(":".join((text, currency, *map(str, sums))).encode())


def _fingerprint(
    buckets: Mapping[tuple[date, str], list[int]] | Mapping[tuple[datetime, str], list[int]],
    *,
    hourly: bool,
) -> tuple[int, int]:
    total = 0
    for (when, currency), sums in buckets.items():
        total += _crc_of(when, currency, sums, hourly=hourly)
    return len(buckets), total


def _day_fingerprints(
    buckets: Mapping[tuple[date, str], list[int]] | Mapping[tuple[datetime, str], list[int]],
    *,
    hourly: bool,
) -> dict[date, tuple[int, int]]:
    days: dict[date, tuple[int, int]] = {}
    for (when, currency), sums in buckets.items():
        day = when.date() if isinstance(when, datetime) else when
        n, total = days.get(day, (0, 0))
        days[day] = (n + 1, total + _crc_of(when, currency, sums, hourly=hourly))
    return days


def _first_pass(
    conn: sa.Connection,
    plan: Mapping[str, set[date] | None],
    zones: Mapping[str, ZoneInfo],
    fallback: ZoneInfo,
) -> dict[str, set[date] | None]:
    """``plan`` narrowed to what may differ: the merchants whose stored buckets do not
    fingerprint (count, sum of CRC32s, per merchant, computed by the database) the same as the
    buckets their rows make, each with the days (of its scope) whose per-day fingerprints
    differ.

    The rows are summed by the database per (merchant, currency, UTC hour), which is exact for
    local hours and days wherever the zone's offset is a whole number of hours; a merchant with
    any other offset in the window keeps its whole scope for the exact check. The window is
    every day from the earliest to the latest day of the scope (all days when a merchant's
    scope is None), for every merchant of the plan: more than the scope, never less.
    """
    enable_crc32(conn)
    if conn.dialect.name == "mysql":
        # The grouping below makes one row per merchant, currency and hour: kept in memory
        # rather than in an on-disk temporary table (16 MiB by default), for this session.
        size = GROUPING_MEMORY
        conn.exec_driver_sql(f"SET SESSION tmp_table_size = {size}, max_heap_table_size = {size}")
        try:
            return _first_pass_grouped(conn, plan, zones, fallback)
        finally:
            conn.exec_driver_sql(
                "SET SESSION tmp_table_size = DEFAULT, max_heap_table_size = DEFAULT"
            )
    return _first_pass_grouped(conn, plan, zones, fallback)


def _first_pass_grouped(
    conn: sa.Connection,
    plan: Mapping[str, set[date] | None],
    zones: Mapping[str, ZoneInfo],
    fallback: ZoneInfo,
) -> dict[str, set[date] | None]:
    p, r = payments.c, refunds.c
    d, h = merchant_daily_totals.c, merchant_hourly_totals.c
    pay_where: list[sa.ColumnElement[bool]] = []
    ref_where: list[sa.ColumnElement[bool]] = []
    daily_where: list[sa.ColumnElement[bool]] = []
    hourly_where: list[sa.ColumnElement[bool]] = []
    first: date | None = None
    last: date | None = None
    if not any(days is None for days in plan.values()):
        all_days = [day for days in plan.values() if days for day in days]
        first, last = min(all_days), max(all_days)
        used = {zones.get(m, fallback) for m in plan}
        start = min(_window([first], zone)[0] for zone in used)
        end = max(_window([last], zone)[1] for zone in used)
        pay_where = [p.created_at >= start, p.created_at < end]
        ref_where = [p.created_at < end, r.created_at >= start, r.created_at < end]
        daily_where = [d.day >= first, d.day <= last]
        hourly_where = [
            h.hour >= datetime.combine(first, time()),
            h.hour < datetime.combine(last + timedelta(days=1), time()),
        ]
    pay_hour, ref_hour = _utc_hour(p.created_at), _utc_hour(r.created_at)
    grouped = (
        (
            sa.select(
                p.merchant_id, p.currency, pay_hour, sa.func.count(), sa.func.sum(p.captured_amount)
            )
            .where(*pay_where)
            .group_by(p.merchant_id, p.currency, pay_hour),
            0,
        ),
        (
            sa.select(p.merchant_id, r.currency, ref_hour, sa.func.count(), sa.func.sum(r.amount))
            .select_from(refunds.join(payments, payments.c.payment_id == r.payment_id))
            .where(*ref_where)
            .group_by(p.merchant_id, r.currency, ref_hour),
            2,
        ),
    )
    expected: dict[str, _Buckets] = {}
    unaligned: set[str] = set()
    for query, index in grouped:
        for merchant_id, currency, hour, count, amount in conn.execute(query):
            if merchant_id not in plan or merchant_id in unaligned:
                continue
            local = _local_hour(str(hour), zones.get(merchant_id, fallback))
            if local is None:
                unaligned.add(merchant_id)
                continue
            day = local.date()
            if first is not None and last is not None and not first <= day <= last:
                continue
            buckets = expected.get(merchant_id)
            if buckets is None:
                buckets = expected[merchant_id] = _Buckets()
            for sums in (
                buckets.daily.setdefault((day, currency), [0, 0, 0, 0]),
                buckets.hourly.setdefault((local, currency), [0, 0, 0, 0]),
            ):
                sums[index] += int(count)
                sums[index + 1] += int(amount)
    stored_daily = _stored_fingerprints(conn, merchant_daily_totals, 10, daily_where)
    stored_hourly = _stored_fingerprints(conn, merchant_hourly_totals, 13, hourly_where)
    differing: set[str] = set()
    for merchant_id in plan:
        if merchant_id in unaligned:
            continue
        buckets = expected.get(merchant_id, _Buckets())
        daily = _fingerprint(buckets.daily, hourly=False)
        hourly = _fingerprint(buckets.hourly, hourly=True)
        stored = (stored_daily.get(merchant_id, (0, 0)), stored_hourly.get(merchant_id, (0, 0)))
        if (daily, hourly) != stored:
            differing.add(merchant_id)
    narrowed: dict[str, set[date] | None] = {m: plan[m] for m in sorted(unaligned)}
    if not differing:
        return narrowed
    # Down to the days that differ, so a merchant with a long history is not checked whole
    # for one wrong day.
    stored_days = (
        _stored_day_fingerprints(conn, merchant_daily_totals, 10, daily_where, differing),
        _stored_day_fingerprints(conn, merchant_hourly_totals, 13, hourly_where, differing),
    )
    for merchant_id in sorted(differing):
        buckets = expected.get(merchant_id, _Buckets())
        want = (
            _day_fingerprints(buckets.daily, hourly=False),
            _day_fingerprints(buckets.hourly, hourly=True),
        )
        days = {day for m, day in (*stored_days[0], *stored_days[1]) if m == merchant_id}
        days |= want[0].keys() | want[1].keys()
        wrong = {
            day
            for day in days
            if want[0].get(day, (0, 0)) != stored_days[0].get((merchant_id, day), (0, 0))
            or want[1].get(day, (0, 0)) != stored_days[1].get((merchant_id, day), (0, 0))
        }
        scope = plan[merchant_id]
        if scope is not None:
            wrong &= scope
        if wrong:
            narrowed[merchant_id] = wrong
    return dict(sorted(narrowed.items()))
