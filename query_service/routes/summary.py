"""``GET /v1/merchants/{merchant_id}/summary``: a merchant's totals by day or hour, from the
totals tables the projector maintains in the same transaction as the payments they sum."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kessai.clock import utcnow
from kessai.errors import ErrorOut
from query_service import handlers, time_range
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
from query_service.time_range import Granularity

EXPENSIVE_RANGE = timedelta(days=31)
"""A summary over a longer range counts against the key's tighter rate limit."""
_ONE_MICROSECOND = timedelta(microseconds=1)

router = APIRouter()


@router.get(
    "/v1/merchants/{merchant_id}/summary",
    response_model=SummaryOut,
    responses={
        **DATA_ERRORS,
        422: {"model": ErrorOut, "description": "Invalid parameters, or `range_too_large`."},
        404: MERCHANT_404,
    },
    summary="A merchant's totals by day or hour",
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
            lambda: handlers.merchant_summary(
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
