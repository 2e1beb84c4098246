"""The write store sums events per UTC quarter hour, and each quarter hour lands in one local
hour: for a merchant half an hour off UTC (Kolkata, +05:30), an amount moved between two of its
hours that share a UTC hour is found, and right totals are left alone. Both backends (the
quarter hour is computed by each database's own date functions)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.db import create_db_engine
from kessai.ids import bound_at, new_id
from kessai.schema.read import merchant_daily_totals, merchant_hourly_totals, merchants
from kessai.schema.write import events
from reconciler.buckets import expected_from
from reconciler.records import Scope
from reconciler.sums import sum_events
from reconciler.totals import check_totals

KOLKATA = "Asia/Kolkata"
# Both at UTC 04:xx; in Kolkata 09:50 and 10:10, two local hours of one day.
CAPTURES = [
    (datetime(2026, 11, 30, 4, 20, tzinfo=UTC), 1_000),
    (datetime(2026, 11, 30, 4, 40, tzinfo=UTC), 500),
]


@pytest.fixture
def stores(write_db_url: str, read_db_url: str) -> Iterator[tuple[Engine, Engine]]:
    write_engine, read_engine = create_db_engine(write_db_url), create_db_engine(read_db_url)
    yield write_engine, read_engine
    write_engine.dispose()
    read_engine.dispose()


def totals_row(when: date | datetime, count: int, amount: int) -> dict[str, object]:
    bucket = "hour" if isinstance(when, datetime) else "day"
    return {
        "merchant_id": "m-kol",
        bucket: when,
        "currency": "JPY",
        "payments_count": count,
        "payments_amount": amount,
        "refunds_count": 0,
        "refunds_amount": 0,
    }


def check(write_engine: Engine, read_engine: Engine) -> list[tuple[str, str]]:
    """A full check of the totals, without repair: (kind, bucket) of each finding."""
    with write_engine.connect() as wconn:
        grouped = sum_events(wconn, lower=None, below=bound_at(datetime.now(UTC)))
    expected = expected_from(grouped, {"m-kol": ZoneInfo(KOLKATA)}, ZoneInfo("Asia/Tokyo"))
    with read_engine.connect() as rconn:
        found = check_totals(
            rconn,
            scope=Scope(),
            expected=expected,
            one_by_one=[],
            default_zone="Asia/Tokyo",
            repair=False,
        )
    return [
        (f.kind, str((f.details or {}).get("hour") or (f.details or {}).get("day"))) for f in found
    ]


def test_an_amount_moved_between_two_hours_of_a_half_hour_zone_is_found(
    stores: tuple[Engine, Engine],
) -> None:
    write_engine, read_engine = stores
    with write_engine.begin() as conn:
        for at, amount in CAPTURES:
            conn.execute(
                events.insert().values(
                    payment_id=new_id(),
                    version=1,
                    event_id=new_id(),
                    event_type="PaymentCaptured",
                    schema_version=1,
                    merchant_id="m-kol",
                    amount=amount,
                    currency="JPY",
                    occurred_at=at,
                    recorded_at=at + timedelta(milliseconds=5),
                    body="{}",
                )
            )
    # The stored buckets are local hours, naive.
    nine, ten = (
        datetime(2026, 11, 30, h, tzinfo=ZoneInfo(KOLKATA)).replace(tzinfo=None) for h in (9, 10)
    )
    with read_engine.begin() as conn:
        conn.execute(merchants.insert().values(merchant_id="m-kol", time_zone=KOLKATA))
        conn.execute(
            merchant_daily_totals.insert().values(totals_row(date(2026, 11, 30), 2, 1_500))
        )
        conn.execute(
            merchant_hourly_totals.insert(),
            [totals_row(nine, 1, 1_000), totals_row(ten, 1, 500)],
        )
    assert check(write_engine, read_engine) == []

    # The day's total stays right; its two hours swap their amounts.
    with read_engine.begin() as conn:
        for hour, amount in ((nine, 500), (ten, 1_000)):
            conn.execute(
                sa.update(merchant_hourly_totals)
                .where(merchant_hourly_totals.c.hour == hour)
                .values(payments_amount=amount)
            )
    assert check(write_engine, read_engine) == [
        ("hourly_totals", "2026-11-30T09:00:00"),
        ("hourly_totals", "2026-11-30T10:00:00"),
    ]
