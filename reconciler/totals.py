"""Merchant totals checked against the rows they sum, and rewritten from them when wrong.

A payment counts in the bucket (local day, local hour) of its creation, a refund in its own, in
the merchant's time zone (``merchants`` or the default). Everything here runs inside one
read-DB transaction that first locks every projector offset row of the topic: no projector
batch can commit between reading the rows and rewriting the totals.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

from kessai.db import upsert
from kessai.offsets import lock_offsets
from kessai.schema.read import (
    merchant_daily_totals,
    merchant_hourly_totals,
    merchants,
    payments,
    projector_offsets,
    refunds,
)
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
