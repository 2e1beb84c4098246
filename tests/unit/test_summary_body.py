"""The summary's answer, built in one pass, is byte for byte what the straightforward build
gives: every bucket zero-filled in order, sums per currency, DST corners kept."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from kessai.errors import ApiError
from query_service import time_range
from query_service.routes.summary import SummaryRow, bucket_end, summary_body
from query_service.time_range import Bucket, BucketKey, Granularity

COLUMNS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")


def reference(
    rows: list[SummaryRow], zone: ZoneInfo, granularity: Granularity, buckets: list[Bucket]
) -> dict[str, Any]:
    """The build as it was: a dict per row, then per bucket, sorted by start."""
    starts: dict[BucketKey, datetime] = {b.key: b.start for b in buckets}
    by_currency: dict[str, dict[BucketKey, dict[str, int]]] = {}
    for bucket, currency, *values in rows:
        if bucket not in starts:
            starts[bucket] = (
                bucket.replace(tzinfo=zone)
                if isinstance(bucket, datetime)
                else datetime.combine(bucket, time(), tzinfo=zone)
            )
        by_currency.setdefault(currency, {})[bucket] = dict(zip(COLUMNS, values, strict=True))
    keys = sorted(starts, key=lambda k: starts[k])
    currencies = []
    for currency in sorted(by_currency):
        series, overall = [], dict.fromkeys(COLUMNS, 0)
        for key in keys:
            totals = by_currency[currency].get(key) or dict.fromkeys(COLUMNS, 0)
            for c in COLUMNS:
                overall[c] += totals[c]
            net = totals["payments_amount"] - totals["refunds_amount"]
            series.append({"bucket": key, "start": starts[key], **totals, "net_amount": net})
        net = overall["payments_amount"] - overall["refunds_amount"]
        currencies.append({"currency": currency, **overall, "net_amount": net, "buckets": series})
    return {
        "merchant_id": "m1",
        "time_zone": zone.key,
        "granularity": granularity,
        "from": buckets[0].start,
        "to": bucket_end(buckets[-1], granularity, zone),
        "currencies": currencies,
    }


@pytest.mark.parametrize(
    ("zone", "first", "days", "granularity", "corner"),
    [
        ("Asia/Tokyo", date(2026, 11, 25), 7, "hour", None),
        ("Asia/Kolkata", date(2026, 11, 1), 30, "day", None),
        ("America/New_York", date(2026, 10, 31), 2, "hour", None),  # the hour that repeats
        # The hour that does not exist: a row there (never written, but kept if it were).
        (
            "America/New_York",
            date(2026, 3, 8),
            1,
            "hour",
            datetime.combine(date(2026, 3, 8), time(2)),
        ),
        ("Europe/London", date(2026, 3, 27), 5, "day", date(2026, 3, 26)),
    ],
)
def test_one_pass_equals_the_straightforward_build(
    zone: str, first: date, days: int, granularity: Granularity, corner: BucketKey | None
) -> None:
    tz = ZoneInfo(zone)
    start = datetime.combine(first, time(), tzinfo=tz).astimezone(UTC)
    end = datetime.combine(first + timedelta(days=days), time(), tzinfo=tz).astimezone(UTC)
    buckets = time_range.buckets(start, end, tz, granularity)
    rng = random.Random(7)
    keys = [b.key for b in buckets] + ([corner] if corner is not None else [])
    rows: list[SummaryRow] = [
        (key, currency, rng.randint(0, 9), rng.randint(0, 99_999), rng.randint(0, 2), 100)
        for key in keys
        for currency in ("JPY", "USD")
        if rng.random() < (1.0 if key == corner else 0.4)
    ]
    rows.sort(key=lambda r: (str(r[0]), r[1]))
    for subset in (rows, [r for r in rows if r[1] == "USD"], []):
        got = summary_body(
            subset, merchant_id="m1", zone=tz, granularity=granularity, buckets=buckets
        )
        want = reference(subset, tz, granularity, buckets)
        assert orjson.dumps(got) == orjson.dumps(want)


def test_walks_are_reused_and_refusals_are_not_kept() -> None:
    tz = ZoneInfo("America/New_York")
    start = datetime(2026, 10, 31, 4, tzinfo=UTC)
    end = start + timedelta(days=2)
    first = time_range.buckets(start, end, tz, "hour")
    again = time_range.buckets(start, end, tz, "hour")
    assert again == first
    assert again is not first  # a list of its own for every caller
    assert len(first) == 47  # 48 hours, the repeated local hour once
    too_long = end + timedelta(days=40)
    for _ in range(2):
        with pytest.raises(ApiError, match="spans at most"):
            time_range.buckets(start, too_long, tz, "hour")
