"""Routes of the query API: parse and validate, then hand the read to a handler.

Handlers block on the database, so they run in worker threads behind a capacity limiter sized
to the connection pool (a bulkhead, as in the command API). Identifiers are validated before
any SQL runs. Every data response says how fresh it is: body fields ``as_of`` / ``lag_seconds``
and headers ``X-Kessai-As-Of`` / ``X-Kessai-Lag-Seconds`` (the headers are absent while nothing
was ever projected). Freshness is read before the data, so the data is at least that fresh.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import WithJsonSchema
from sqlalchemy.engine import Engine
from starlette.responses import Response, StreamingResponse

from kessai.auth import ADMIN, USERS_READ, needs, principal_of
from kessai.clock import utcnow
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.money import MAX_AMOUNT
from kessai.observability import metrics_response
from kessai.ratelimit import RateLimiter
from kessai.settings import Settings
from query_service import export, handlers, repository, time_range
from query_service.cache import CachedSummary, FreshnessCache, SummaryCache, ZoneCache
from query_service.cursor import CURSOR_SCHEMA, Position, decode_cursor, encode_cursor
from query_service.schemas import (
    PaymentDetailOut,
    PaymentMethod,
    PaymentPageOut,
    PaymentStatus,
    ReconciliationRunsOut,
    SummaryOut,
)
from query_service.time_range import Bound, Granularity

router = APIRouter()
T = TypeVar("T")

ID_PATTERN = r"^[A-Za-z0-9_-]+$"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
EXPORT_CHUNK_ROWS = 1_000
"""Rows fetched per query while streaming a CSV: memory stays flat whatever the export's size."""

_ONE_MICROSECOND = timedelta(microseconds=1)
_DATA_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "`unauthorized`: no valid API key."},
    422: {"model": ErrorOut, "description": "Invalid path or query parameters."},
    429: {"model": ErrorOut, "description": "`rate_limited`: see `Retry-After`."},
    503: {"model": ErrorOut, "description": "The read database does not answer."},
}
_LIST_ERRORS: dict[int | str, dict[str, Any]] = {
    **_DATA_ERRORS,
    400: {"model": ErrorOut, "description": "`invalid_cursor`: not a cursor this API issued."},
}


def _page_links(owner: str) -> dict[int | str, dict[str, Any]]:
    """A page leads to the next page (same owner, its `next_cursor`) and to its first payment:
    for clients, and for the stateful tests that follow them."""
    return {
        200: {
            "links": {
                "NextPage": {
                    "operationId": f"list_{owner}_payments",
                    "parameters": {
                        f"path.{owner}_id": f"$request.path.{owner}_id",
                        "query.cursor": "$response.body#/next_cursor",
                    },
                    "description": "The next page, until `next_cursor` is null.",
                },
                "FirstPayment": {
                    "operationId": "get_payment",
                    "parameters": {"path.payment_id": "$response.body#/items/0/payment_id"},
                    "description": "The page's first payment with its refunds.",
                },
            }
        }
    }


@dataclass(frozen=True, slots=True)
class Resources:
    """What the routes use, opened and closed by the app's lifespan."""

    settings: Settings
    engine: Engine
    limiter: anyio.CapacityLimiter
    zones: ZoneCache
    freshness: FreshnessCache
    summaries: SummaryCache

    async def run(self, call: Callable[[], T]) -> T:
        """Run a blocking read in a worker thread, within the bulkhead."""
        return await anyio.to_thread.run_sync(call, limiter=self.limiter)


# The dependencies are coroutines although none awaits: FastAPI runs a plain function
# dependency in a worker thread, a thread hop per request.
async def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(_resources)]
MerchantIdPath = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=ID_PATTERN, description="1-64 of [A-Za-z0-9_-]."),
]
UserIdPath = MerchantIdPath  # the same identifier rules (kessai.events.MerchantId / UserId)
LimitQuery = Annotated[
    int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"Page size, 1-{MAX_PAGE_SIZE}.")
]
CursorQuery = Annotated[
    str | None,
    Query(
        description="`next_cursor` of the previous page; omit for the first. Opaque: a cursor "
        "this API did not issue is refused with 400 `invalid_cursor`."
    ),
    WithJsonSchema(CURSOR_SCHEMA),
]
_BOUND_HELP = (
    "An ISO 8601 datetime with an offset (an instant), or a date YYYY-MM-DD (a whole day in "
    "the merchant's time zone); years 1970 to 9998."
)
FromQuery = Annotated[
    str | None,
    Query(alias="from", max_length=64, description=f"Inclusive start. {_BOUND_HELP}"),
    WithJsonSchema(time_range.BOUND_SCHEMA),
]
ToQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description=f"End: a datetime is exclusive, a date includes its whole day. {_BOUND_HELP}",
    ),
    WithJsonSchema(time_range.BOUND_SCHEMA),
]


# -- who may read what -----------------------------------------------------------------------


def _merchant_not_found(merchant_id: str) -> ApiError:
    return ApiError(404, "merchant_not_found", "No such merchant.", {"merchant_id": merchant_id})


async def _merchant_reader(request: Request, merchant_id: MerchantIdPath) -> None:
    """The key reads this merchant; otherwise 404, the answer for a merchant that does not
    exist, so that a key learns nothing about merchants that are not its own."""
    if not principal_of(request.state).reads_merchant(merchant_id):
        raise _merchant_not_found(merchant_id)


_MERCHANT_ROUTE: dict[str, Any] = {"dependencies": [Depends(_merchant_reader)]}
_MERCHANT_404 = {"model": ErrorOut, "description": "`merchant_not_found`: not this key's."}
_USERS_ROUTE: dict[str, Any] = {"dependencies": [Depends(needs(USERS_READ))]}
_ADMIN_ROUTE: dict[str, Any] = {"dependencies": [Depends(needs(ADMIN))]}
_FORBIDDEN = {"model": ErrorOut, "description": "`forbidden`: the key lacks the scope."}


EXPENSIVE_RANGE = timedelta(days=31)


async def _expensive(request: Request) -> None:
    """Count an expensive read against the key's tighter limit (429 beyond it)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check_expensive(principal_of(request.state))


# -- freshness -------------------------------------------------------------------------------


def _freshness(as_of: datetime | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Body fields and headers saying how fresh an answer computed at ``as_of`` is now."""
    if as_of is None:
        return {"as_of": None, "lag_seconds": None}, {}
    lag = max(0.0, round((utcnow() - as_of).total_seconds(), 3))
    return (
        {"as_of": as_of, "lag_seconds": lag},
        {"X-Kessai-As-Of": as_of.isoformat(), "X-Kessai-Lag-Seconds": f"{lag:.3f}"},
    )


def _data_response(body: dict[str, Any], as_of: datetime | None) -> Response:
    fields, headers = _freshness(as_of)
    return JSONResponse({**body, **fields}, headers=headers)


# -- a merchant's payments: filters ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentFilters:
    from_: Bound | None
    to: Bound | None
    status: str | None
    method: str | None
    user_id: str | None
    store_id: str | None
    min_amount: int | None
    max_amount: int | None


async def _payment_filters(
    from_: FromQuery = None,
    to: ToQuery = None,
    status: Annotated[PaymentStatus | None, Query()] = None,
    method: Annotated[PaymentMethod | None, Query()] = None,
    user_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=ID_PATTERN)] = None,
    store_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    min_amount: Annotated[
        int | None, Query(ge=0, le=MAX_AMOUNT, description="Least captured amount (minor units).")
    ] = None,
    max_amount: Annotated[
        int | None, Query(ge=0, le=MAX_AMOUNT, description="Most captured amount (minor units).")
    ] = None,
) -> PaymentFilters:
    return PaymentFilters(
        from_=time_range.parse_bound(from_, "query.from"),
        to=time_range.parse_bound(to, "query.to"),
        status=status,
        method=method,
        user_id=user_id,
        store_id=store_id,
        min_amount=min_amount,
        max_amount=max_amount,
    )


FiltersDep = Annotated[PaymentFilters, Depends(_payment_filters)]


async def _merchant_where(
    resources: Resources, merchant_id: str, filters: PaymentFilters
) -> list[repository.Condition]:
    zone = (
        await resources.zones.zone_of(merchant_id)
        if time_range.needs_zone(filters.from_, filters.to)
        else None
    )
    instants = time_range.resolve(filters.from_, filters.to, zone)
    return repository.merchant_payments_where(
        merchant_id,
        start=instants.start,
        end=instants.end,
        status=filters.status,
        method=filters.method,
        user_id=filters.user_id,
        store_id=filters.store_id,
        min_amount=filters.min_amount,
        max_amount=filters.max_amount,
    )


async def _page(
    resources: Resources, where: list[repository.Condition], limit: int, after: Position | None
) -> Response:
    as_of = await resources.freshness.as_of()
    page = await resources.run(
        lambda: handlers.payments_page(
            engine=resources.engine, where=where, limit=limit, after=after
        )
    )
    next_cursor = encode_cursor(page.next_position) if page.next_position else None
    return _data_response({"items": page.items, "next_cursor": next_cursor}, as_of)


# -- routes ----------------------------------------------------------------------------------


@router.get(
    "/v1/payments/{payment_id}",
    response_model=PaymentDetailOut,
    responses={**_DATA_ERRORS, 404: {"model": ErrorOut, "description": "`payment_not_found`."}},
    summary="One payment with its refunds",
    operation_id="get_payment",
)
async def get_payment(
    *, payment_id: Annotated[uuid.UUID, Path()], resources: ResourcesDep, request: Request
) -> Response:
    """The payment as the read side knows it, with its refunds (oldest first).

    404 `payment_not_found` also covers a payment captured moments ago that the projector has
    not reached yet (the freshness headers on the 404 say how far it has got), and a payment
    of a merchant the key does not read."""
    as_of = await resources.freshness.as_of()
    body = await resources.run(
        lambda: handlers.payment_detail(engine=resources.engine, payment_id=payment_id)
    )
    if body is None or not principal_of(request.state).reads_merchant(body["merchant_id"]):
        # Another merchant's payment is answered exactly as one that does not exist.
        _, headers = _freshness(as_of)
        raise ApiError(
            404,
            "payment_not_found",
            "No such payment in the read model.",
            {"payment_id": str(payment_id)},
            headers=headers,
        )
    return _data_response(body, as_of)


@router.get(
    "/v1/merchants/{merchant_id}/payments",
    response_model=PaymentPageOut,
    responses={**_LIST_ERRORS, **_page_links("merchant"), 404: _MERCHANT_404},
    summary="A merchant's payments, newest first",
    operation_id="list_merchant_payments",
    **_MERCHANT_ROUTE,
)
async def list_merchant_payments(
    *,
    merchant_id: MerchantIdPath,
    filters: FiltersDep,
    limit: LimitQuery = DEFAULT_PAGE_SIZE,
    cursor: CursorQuery = None,
    resources: ResourcesDep,
) -> Response:
    """A merchant's payments ordered by `created_at` then `payment_id`, newest first, a page
    at a time.

    Time range: `from` is inclusive; a datetime `to` is exclusive, a date `to` includes its
    whole day. Datetimes need an offset; dates are days of the merchant's time zone (its own,
    else the default). So `from=2026-11-01&to=2026-11-30` is all of November there, and
    `from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z` is November in UTC.

    Filters combine with AND: `status`, `method`, `user_id`, `store_id` (exact), and
    `min_amount` / `max_amount` (inclusive, on the captured amount in minor units).

    Paging is by keyset, never by offset: pass `next_cursor` as `cursor` with the same filters
    until it is null. Paging to the end returns every payment that matched when paging began
    exactly once; payments projected meanwhile appear only if they sort after the page you
    are on. A cursor this API did not issue is refused with 400 `invalid_cursor`."""
    after = decode_cursor(cursor) if cursor is not None else None
    where = await _merchant_where(resources, merchant_id, filters)
    return await _page(resources, where, limit, after)


@router.get(
    "/v1/merchants/{merchant_id}/payments.csv",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/csv": {}},
            "description": "A CSV file: a header row, then one row per payment, newest first.",
        },
        **_DATA_ERRORS,
        422: {
            "model": ErrorOut,
            "description": "Invalid parameters, or `csv_too_large`: more rows than the cap.",
        },
        404: _MERCHANT_404,
    },
    summary="A merchant's payments as a CSV download",
    **_MERCHANT_ROUTE,
)
async def export_merchant_payments(
    *,
    merchant_id: MerchantIdPath,
    filters: FiltersDep,
    resources: ResourcesDep,
    request: Request,
) -> Response:
    """The same payments as the list with the same filters, as one CSV file (UTF-8, RFC 4180
    quoting), streamed in chunks so its size does not matter to memory. A text cell starting
    with `=`, `+`, `-`, `@`, tab or carriage return gets a leading `'`, so that a spreadsheet
    shows it rather than running it as a formula.

    At most `KESSAI_CSV_MAX_ROWS` rows: a bigger export is refused up front with 422
    `csv_too_large` (narrow the range). Freshness is in the headers only. Exports count
    against the key's tighter `KESSAI_RATE_LIMIT_EXPENSIVE` limit."""
    await _expensive(request)
    where = await _merchant_where(resources, merchant_id, filters)
    cap = resources.settings.csv_max_rows
    matching = await resources.run(
        lambda: handlers.count_matching(engine=resources.engine, where=where, cap=cap + 1)
    )
    if matching > cap:
        raise ApiError(
            422,
            "csv_too_large",
            f"More than {cap} payments match; narrow the range or the filters.",
            {"max_rows": cap},
        )
    as_of = await resources.freshness.as_of()
    _, headers = _freshness(as_of)
    filename = f"payments-{merchant_id}-{utcnow():%Y%m%dT%H%M%SZ}.csv"
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(
        _csv_chunks(resources, where), media_type="text/csv; charset=utf-8", headers=headers
    )


async def _csv_chunks(
    resources: Resources, where: list[repository.Condition]
) -> AsyncIterator[bytes]:
    yield export.header()
    after: Position | None = None
    # A failure from here on cannot become an error response (the status line is sent): the
    # server logs it and cuts the download short, which a client sees as an incomplete file.
    while True:
        rows = await resources.run(
            functools.partial(
                handlers.export_rows,
                engine=resources.engine,
                where=where,
                after=after,
                size=EXPORT_CHUNK_ROWS,
            )
        )
        if not rows:
            return
        yield export.rows_to_csv(rows)
        if len(rows) < EXPORT_CHUNK_ROWS:
            return
        after = handlers.position_of(rows[-1])


@router.get(
    "/v1/merchants/{merchant_id}/summary",
    response_model=SummaryOut,
    responses={
        **_DATA_ERRORS,
        422: {"model": ErrorOut, "description": "Invalid parameters, or `range_too_large`."},
        404: _MERCHANT_404,
    },
    summary="A merchant's totals by day or hour",
    **_MERCHANT_ROUTE,
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
        return _data_response(summary.body, summary.as_of)

    end = time_range.end_instant(to_bound, zone) if to_bound is not None else today_end
    if from_bound is not None:
        start = time_range.start_instant(from_bound, zone)
    else:
        start, _ = time_range.day_of(end - _ONE_MICROSECOND, zone)
    if start >= end:
        raise time_range.empty_range("query.to")
    if end - start > EXPENSIVE_RANGE:
        await _expensive(request)
    summary = await compute(time_range.buckets(start, end, zone, g))
    return _data_response(summary.body, summary.as_of)


@router.get(
    "/v1/users/{user_id}/payments",
    response_model=PaymentPageOut,
    responses={**_LIST_ERRORS, **_page_links("user"), 403: _FORBIDDEN},
    summary="A user's own payment history, newest first",
    operation_id="list_user_payments",
    **_USERS_ROUTE,
)
async def list_user_payments(
    *,
    user_id: UserIdPath,
    limit: LimitQuery = DEFAULT_PAGE_SIZE,
    cursor: CursorQuery = None,
    resources: ResourcesDep,
) -> Response:
    """A user's payments at every merchant, newest first, paged by keyset exactly like a
    merchant's list (`next_cursor` until null; 400 `invalid_cursor` for a foreign cursor)."""
    after = decode_cursor(cursor) if cursor is not None else None
    return await _page(resources, repository.user_payments_where(user_id), limit, after)


@router.get(
    "/v1/admin/reconciliation/runs",
    response_model=ReconciliationRunsOut,
    responses={**_DATA_ERRORS, 403: _FORBIDDEN},
    summary="Recorded reconciliation runs and their findings",
    **_ADMIN_ROUTE,
)
async def reconciliation_runs(
    *,
    resources: ResourcesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Runs per page.")] = 20,
    before: Annotated[
        int | None, Query(ge=1, description="`next_before` of the previous page.")
    ] = None,
) -> Response:
    """What `kessai reconcile` found and repaired, run by run, newest first (as
    `kessai reconcile --history`). Needs the `admin` scope. Like every answer, it says how
    fresh the read side is (`as_of`, `lag_seconds`)."""
    as_of = await resources.freshness.as_of()
    body = await resources.run(
        lambda: handlers.reconciliation_runs(engine=resources.engine, before=before, limit=limit)
    )
    return _data_response(body, as_of)


@router.get("/healthz", summary="The process is alive")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="The read database answers", responses={503: {"model": ErrorOut}})
async def readyz(*, resources: ResourcesDep) -> Response:
    try:
        await resources.run(lambda: handlers.ping(engine=resources.engine))
    except sa.exc.SQLAlchemyError as exc:
        raise ApiError(503, "read_db_unavailable", "The read database does not answer.") from exc
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    return await anyio.to_thread.run_sync(metrics_response, registry)
