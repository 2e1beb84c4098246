"""``GET /v1/merchants/{merchant_id}/summary``: a merchant's totals by day or hour, and its
balance, from the totals tables the projector maintains in the same transaction as the payments
they sum.

One read view, top to bottom: the route (the range in the merchant's time zone, today through a
short cache); the read (``read_summary``, in a worker thread, inside one read-only transaction
it owns, never committed, so the range's totals and the balance are of one snapshot); its SQL
(``totals``, one range scan of a totals table's primary key ``(merchant_id, bucket,
currency)``, and ``balance``, one scan of the daily totals' primary key prefix
``merchant_id``); and the answer built from the rows (``summary_body``: every bucket of the
range, zero when nothing happened; ``balance_body``: the balance per currency).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from sqlalchemy.engine import Engine
from starlette.responses import Response

from kessai.clock import utcnow
from kessai.errors import ErrorOut
from kessai.schema.read import merchant_daily_totals, merchant_hourly_totals
from query_service import time_range
from query_service.cache import CachedSummary
from query_service.routes.dependencies import (
    DATA_ERRORS,
    MERCHANT_404,
    MERCHANT_ROUTE,
    FromQuery,
    MerchantIdPath,
    ResourcesDep,
    ToQuery,
    data_response,
    expensive,
)
from query_service.schemas import SummaryOut
from query_service.time_range import Bucket, BucketKey, Granularity

EXPENSIVE_RANGE = timedelta(days=31)
"""A summary over a longer range counts against the key's tighter rate limit."""
_ONE_MICROSECOND = timedelta(microseconds=1)
TOTALS_COLUMNS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")

router = APIRouter()


@router.get(
    "/v1/merchants/{merchant_id}/summary",
    response_model=SummaryOut,
    responses={
        **DATA_ERRORS,
        422: {"model": ErrorOut, "description": "Invalid parameters, or `range_too_large`."},
        404: MERCHANT_404,
    },
    summary="A merchant's totals by day or hour, and its balance",
    **MERCHANT_ROUTE,
)
async def merchant_summary(
    *,
    merchant_id: MerchantIdPath,
    from_: FromQuery = None,
    to: ToQuery = None,
    granularity: Annotated[Literal["day", "hour"], Query()] = "day",
    resources: ResourcesDep,
    request: Request,
) -> Response:
    """Payments and refunds per currency over a range, with a series of buckets.

    Buckets are local to the merchant's time zone: `day` buckets are its calendar days, `hour`
    buckets its local hours. A payment counts in the bucket of its capture, a refund in the
    bucket of the refund (not of the payment). Every bucket of the range is listed, zero when
    nothing happened, so a chart needs no gap filling; a currency appears if anything happened
    in it in the range. A range that starts or ends inside a bucket includes that whole bucket;
    `from` / `to` in the answer are the exact range the buckets cover.

    `balance`: what kessai owes the merchant (its ledger account `merchant:<merchant_id>`), per
    currency: every payment captured (card or balance) minus every refund, over all time, not
    only the range. It is read in the same snapshot as the totals, so it is as of the same
    `as_of`; a merchant with nothing has an empty `balance`.

    Range: `from` / `to` as for the payment list. Without both: the merchant's current day
    (served from a cache for a couple of seconds; its `as_of` is that of the cached answer, so
    `lag_seconds` stays honest). With only `to`: the day it ends in. With only `from`: up to the
    end of the current day. At most 366 days or 744 hours: beyond, 422 `range_too_large`.
    Ranges over 31 days count against the key's tighter `KESSAI_RATE_LIMIT_EXPENSIVE` limit."""
    from_bound = time_range.parse_bound(from_, "query.from")
    to_bound = time_range.parse_bound(to, "query.to")
    zone = await resources.zones.zone_of(merchant_id)
    now = utcnow()
    today_start, today_end = time_range.day_of(now, zone)
    g: Granularity = granularity

    async def compute(buckets: list[time_range.Bucket]) -> CachedSummary:
        as_of = await resources.freshness.as_of()
        body = await resources.run(
            lambda: read_summary(
                engine=resources.engine,
                merchant_id=merchant_id,
                zone=zone,
                granularity=g,
                buckets=buckets,
            )
        )
        return CachedSummary(body=body, as_of=as_of)

    if from_bound is None and to_bound is None:
        buckets = time_range.buckets(today_start, today_end, zone, g)
        key = resources.summaries.key(merchant_id, g, now.astimezone(zone).date())
        summary = await resources.summaries.get_or_compute(key, lambda: compute(buckets))
        return data_response(summary.body, summary.as_of)

    end = time_range.end_instant(to_bound, zone) if to_bound is not None else today_end
    if from_bound is not None:
        start = time_range.start_instant(from_bound, zone)
    else:
        start, _ = time_range.day_of(end - _ONE_MICROSECOND, zone)
    if start >= end:
        raise time_range.empty_range("query.to")
    if end - start > EXPENSIVE_RANGE:
        await expensive(request)
    summary = await compute(time_range.buckets(start, end, zone, g))
    return data_response(summary.body, summary.as_of)


# -- the read and its SQL ---------------------------------------------------------------------


def read_summary(
    *,
    engine: Engine,
    merchant_id: str,
    zone: ZoneInfo,
    granularity: Granularity,
    buckets: Sequence[Bucket],
) -> dict[str, Any]:
    """Totals per currency over ``buckets``, each with its zero-filled series, and the
    merchant's balance over all time.

    Both reads share one connection, hence one transaction: REPEATABLE READ on MySQL, a
    deferred ``BEGIN`` on SQLite (``query_service.engine``), so the balance never counts a
    payment the totals of the same answer do not (or the other way around)."""
    with engine.connect() as conn:
        rows = totals(
            conn,
            merchant_id,
            granularity=granularity,
            first=buckets[0].key,
            last=buckets[-1].key,
        )
        balance_rows = balance(conn, merchant_id)
    body = summary_body(
        [
            (
                r.bucket,
                r.currency,
                r.payments_count,
                r.payments_amount,
                r.refunds_count,
                r.refunds_amount,
            )
            for r in rows
        ],
        merchant_id=merchant_id,
        zone=zone,
        granularity=granularity,
        buckets=buckets,
    )
    body["balance"] = balance_body(balance_rows)
    return body


def totals(
    conn: sa.Connection,
    merchant_id: str,
    *,
    granularity: str,
    first: date | datetime,
    last: date | datetime,
) -> Sequence[sa.Row[Any]]:
    """A merchant's totals rows for buckets ``first`` to ``last`` (inclusive), in key order."""
    table = merchant_daily_totals if granularity == "day" else merchant_hourly_totals
    bucket = table.c.day if granularity == "day" else table.c.hour
    return conn.execute(
        sa.select(bucket.label("bucket"), table.c.currency, *(table.c[c] for c in TOTALS_COLUMNS))
        .where(table.c.merchant_id == merchant_id, bucket >= first, bucket <= last)
        .order_by(bucket, table.c.currency)
    ).all()


def balance(conn: sa.Connection, merchant_id: str) -> Sequence[sa.Row[Any, Any]]:
    """The balance of the ledger account ``merchant:<merchant_id>`` per currency, over all
    time: every captured payment (``world:acquirer`` or ``user:`` -> merchant) minus every
    refund (its reverse). Summed from the daily totals, one scan of the primary key prefix
    ``merchant_id`` (a row per currency and day with activity, about 365 a year), so it is
    exactly the buckets the reconciler verifies against the write store, and no row on either
    side is updated by every payment. A currency the merchant ever had activity in has a row
    (possibly 0); payouts, when they exist, are one more sum to subtract here."""
    t = merchant_daily_totals
    return conn.execute(
        sa.select(
            t.c.currency,
            (sa.func.sum(t.c.payments_amount) - sa.func.sum(t.c.refunds_amount)).label("amount"),
        )
        .where(t.c.merchant_id == merchant_id)
        .group_by(t.c.currency)
        .order_by(t.c.currency)
    ).all()


# -- the answer ------------------------------------------------------------------------------


SummaryRow = tuple[BucketKey, str, int, int, int, int]
"""(bucket, currency, payments_count, payments_amount, refunds_count, refunds_amount)."""


def summary_body(
    rows: Sequence[SummaryRow],
    *,
    merchant_id: str,
    zone: ZoneInfo,
    granularity: Granularity,
    buckets: Sequence[Bucket],
) -> dict[str, Any]:
    """The summary's answer from its totals rows, in one pass per currency over the buckets:
    a dict literal per bucket, sums kept in locals (a 7-day hourly summary has 168 buckets per
    currency, and building them was most of the request's own work)."""
    starts: dict[BucketKey, datetime] = {b.key: b.start for b in buckets}
    by_currency: dict[str, dict[BucketKey, tuple[int, int, int, int]]] = {}
    walked = True
    for bucket, currency, pc, pa, rc, ra in rows:
        if bucket not in starts:
            # A bucket the walk did not produce (a DST corner) is still counted, never dropped.
            starts[bucket] = _bucket_start(bucket, zone)
            walked = False
        by_currency.setdefault(currency, {})[bucket] = (int(pc), int(pa), int(rc), int(ra))
    ordered = list(starts.items())
    if not walked:
        ordered.sort(key=lambda item: item[1])
    currencies = []
    for currency in sorted(by_currency):
        filled = by_currency[currency]
        series = []
        total_pc = total_pa = total_rc = total_ra = 0
        for key, start in ordered:
            found = filled.get(key)
            if found is None:
                series.append(
                    {
                        "bucket": key,
                        "start": start,
                        "payments_count": 0,
                        "payments_amount": 0,
                        "refunds_count": 0,
                        "refunds_amount": 0,
                        "net_amount": 0,
                    }
                )
                continue
            pc, pa, rc, ra = found
            total_pc += pc
            total_pa += pa
            total_rc += rc
            total_ra += ra
            series.append(
                {
                    "bucket": key,
                    "start": start,
                    "payments_count": pc,
                    "payments_amount": pa,
                    "refunds_count": rc,
                    "refunds_amount": ra,
                    "net_amount": pa - ra,
                }
            )
        currencies.append(
            {
                "currency": currency,
                "payments_count": total_pc,
                "payments_amount": total_pa,
                "refunds_count": total_rc,
                "refunds_amount": total_ra,
                "net_amount": total_pa - total_ra,
                "buckets": series,
            }
        )
    return {
        "merchant_id": merchant_id,
        "time_zone": zone.key,
        "granularity": granularity,
        "from": buckets[0].start,
        "to": bucket_end(buckets[-1], granularity, zone),
        "currencies": currencies,
    }


def balance_body(rows: Sequence[sa.Row[Any, Any]]) -> list[dict[str, Any]]:
    """The answer's ``balance``: ``{currency, amount}`` per currency, by currency; a merchant
    with nothing has an empty list. (MySQL sums ``BIGINT`` to ``DECIMAL``: back to ``int``.)"""
    return [{"currency": r.currency, "amount": int(r.amount)} for r in rows]


def _bucket_start(key: BucketKey, zone: ZoneInfo) -> datetime:
    if isinstance(key, datetime):
        return key.replace(tzinfo=zone)
    return datetime.combine(key, time(), tzinfo=zone)


def bucket_end(last: Bucket, granularity: Granularity, zone: ZoneInfo) -> datetime:
    """The first instant after ``last``, in the merchant's time zone."""
    if granularity == "day":
        assert isinstance(last.key, date)
        return datetime.combine(last.key + timedelta(days=1), time(), tzinfo=zone)
    return (last.start.astimezone(UTC) + timedelta(hours=1)).astimezone(zone)
