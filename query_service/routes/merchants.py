"""A merchant's payments: ``GET /v1/merchants/{merchant_id}/payments`` (keyset pages) and
``.../payments.csv`` (a streamed download); both take the same filters."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from kessai.clock import utcnow
from kessai.errors import ApiError, ErrorOut
from query_service import export, handlers, repository
from query_service.cursor import Position, decode_cursor
from query_service.routes.dependencies import (
    DATA_ERRORS,
    DEFAULT_PAGE_SIZE,
    LIST_ERRORS,
    MERCHANT_404,
    MERCHANT_ROUTE,
    CursorQuery,
    FiltersDep,
    LimitQuery,
    MerchantIdPath,
    Resources,
    ResourcesDep,
    expensive,
    freshness,
    merchant_where,
    page_links,
    page_response,
)
from query_service.schemas import PaymentPageOut

EXPORT_CHUNK_ROWS = 1_000
"""Rows fetched per query while streaming a CSV: memory stays flat whatever the export's size."""

router = APIRouter()


@router.get(
    "/v1/merchants/{merchant_id}/payments",
    response_model=PaymentPageOut,
    responses={**LIST_ERRORS, **page_links("merchant"), 404: MERCHANT_404},
    summary="A merchant's payments, newest first",
    operation_id="list_merchant_payments",
    **MERCHANT_ROUTE,
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
    where = await merchant_where(resources, merchant_id, filters)
    return await page_response(resources, where, limit, after)


@router.get(
    "/v1/merchants/{merchant_id}/payments.csv",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/csv": {}},
            "description": "A CSV file: a header row, then one row per payment, newest first.",
        },
        **DATA_ERRORS,
        422: {
            "model": ErrorOut,
            "description": "Invalid parameters, or `csv_too_large`: more rows than the cap.",
        },
        404: MERCHANT_404,
    },
    summary="A merchant's payments as a CSV download",
    **MERCHANT_ROUTE,
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
    await expensive(request)
    where = await merchant_where(resources, merchant_id, filters)
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
    _, headers = freshness(as_of)
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
