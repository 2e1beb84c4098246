"""What the query API's routes share: their resources, parameter types, who may read what,
documented errors, and the freshness every data response carries.

Handlers block on the database, so ``Resources.run`` runs them in worker threads behind a
capacity limiter sized to the connection pool (a bulkhead, as in the command API). Identifiers
are validated before any SQL runs. Every data response says how fresh it is: body fields
``as_of`` / ``lag_seconds`` and headers ``X-Kessai-As-Of`` / ``X-Kessai-Lag-Seconds`` (the
headers are absent while nothing was ever projected). Freshness is read before the data, so
the data is at least that fresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Path, Query, Request
from pydantic import WithJsonSchema
from sqlalchemy.engine import Engine
from starlette.responses import Response

from kessai.auth import ADMIN, USERS_READ, needs, principal_of
from kessai.clock import utcnow
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.money import MAX_AMOUNT
from kessai.ratelimit import RateLimiter
from kessai.settings import Settings
from query_service import handlers, repository, time_range
from query_service.cache import FreshnessCache, SummaryCache, ZoneCache
from query_service.cursor import CURSOR_SCHEMA, Position, encode_cursor
from query_service.schemas import PaymentMethod, PaymentStatus
from query_service.time_range import Bound

T = TypeVar("T")

ID_PATTERN = r"^[A-Za-z0-9_-]+$"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

DATA_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "`unauthorized`: no valid API key."},
    422: {"model": ErrorOut, "description": "Invalid path or query parameters."},
    429: {"model": ErrorOut, "description": "`rate_limited`: see `Retry-After`."},
    503: {"model": ErrorOut, "description": "The read database does not answer."},
}
LIST_ERRORS: dict[int | str, dict[str, Any]] = {
    **DATA_ERRORS,
    400: {"model": ErrorOut, "description": "`invalid_cursor`: not a cursor this API issued."},
}


def page_links(owner: str) -> dict[int | str, dict[str, Any]]:
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


MERCHANT_ROUTE: dict[str, Any] = {"dependencies": [Depends(_merchant_reader)]}
MERCHANT_404 = {"model": ErrorOut, "description": "`merchant_not_found`: not this key's."}
USERS_ROUTE: dict[str, Any] = {"dependencies": [Depends(needs(USERS_READ))]}
ADMIN_ROUTE: dict[str, Any] = {"dependencies": [Depends(needs(ADMIN))]}
FORBIDDEN = {"model": ErrorOut, "description": "`forbidden`: the key lacks the scope."}


async def expensive(request: Request) -> None:
    """Count an expensive read against the key's tighter limit (429 beyond it)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check_expensive(principal_of(request.state))


# -- freshness -------------------------------------------------------------------------------


def freshness(as_of: datetime | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Body fields and headers saying how fresh an answer computed at ``as_of`` is now."""
    if as_of is None:
        return {"as_of": None, "lag_seconds": None}, {}
    lag = max(0.0, round((utcnow() - as_of).total_seconds(), 3))
    return (
        {"as_of": as_of, "lag_seconds": lag},
        {"X-Kessai-As-Of": as_of.isoformat(), "X-Kessai-Lag-Seconds": f"{lag:.3f}"},
    )


def data_response(body: dict[str, Any], as_of: datetime | None) -> Response:
    fields, headers = freshness(as_of)
    return JSONResponse({**body, **fields}, headers=headers)


# -- a merchant's payments: filters, and a page of payments -----------------------------------


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


async def merchant_where(
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


async def page_response(
    resources: Resources, where: list[repository.Condition], limit: int, after: Position | None
) -> Response:
    """One keyset page of the payments ``where`` selects, with its cursor and freshness."""
    as_of = await resources.freshness.as_of()
    page = await resources.run(
        lambda: handlers.payments_page(
            engine=resources.engine, where=where, limit=limit, after=after
        )
    )
    next_cursor = encode_cursor(page.next_position) if page.next_position else None
    return data_response({"items": page.items, "next_cursor": next_cursor}, as_of)
