"""A user's own reads (scope ``users:read``): ``GET /v1/users/{user_id}/payments`` (the payment
history), ``.../balance`` (the wallet's balance) and ``.../statement`` (the wallet's movements)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from query_service import handlers, repository
from query_service.cursor import decode_cursor, decode_statement_cursor, encode_statement_cursor
from query_service.routes.dependencies import (
    DATA_ERRORS,
    DEFAULT_PAGE_SIZE,
    FORBIDDEN,
    LIST_ERRORS,
    USERS_ROUTE,
    CursorQuery,
    LimitQuery,
    ResourcesDep,
    UserIdPath,
    data_response,
    page_links,
    page_response,
)
from query_service.schemas import BalanceOut, PaymentPageOut, StatementPageOut

router = APIRouter()


@router.get(
    "/v1/users/{user_id}/payments",
    response_model=PaymentPageOut,
    responses={**LIST_ERRORS, **page_links("user"), 403: FORBIDDEN},
    summary="A user's own payment history, newest first",
    operation_id="list_user_payments",
    **USERS_ROUTE,
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
    return await page_response(resources, repository.user_payments_where(user_id), limit, after)


@router.get(
    "/v1/users/{user_id}/balance",
    response_model=BalanceOut,
    responses={**DATA_ERRORS, 403: FORBIDDEN},
    summary="A user's wallet balance",
    operation_id="get_user_balance",
    **USERS_ROUTE,
)
async def get_user_balance(*, user_id: UserIdPath, resources: ResourcesDep) -> Response:
    """The balance of the user's wallet as of `as_of` (the read side's freshness), with its
    currency and how many movements it has had.

    A user whose wallet nothing has moved money in yet (or whom kessai does not know) has an
    empty wallet: 200 with balance 0, currency null and version 0, never a 404."""
    as_of = await resources.freshness.as_of()
    body = await resources.run(lambda: handlers.balance(engine=resources.engine, user_id=user_id))
    return data_response(body, as_of)


_STATEMENT_LINKS: dict[int | str, dict[str, Any]] = {
    200: {
        "links": {
            "NextPage": {
                "operationId": "list_user_statement",
                "parameters": {
                    "path.user_id": "$request.path.user_id",
                    "query.cursor": "$response.body#/next_cursor",
                },
                "description": "The next (older) page, until `next_cursor` is null.",
            }
        }
    }
}


@router.get(
    "/v1/users/{user_id}/statement",
    response_model=StatementPageOut,
    responses={**LIST_ERRORS, **_STATEMENT_LINKS, 403: FORBIDDEN},
    summary="A user's wallet movements, newest first",
    operation_id="list_user_statement",
    **USERS_ROUTE,
)
async def list_user_statement(
    *,
    user_id: UserIdPath,
    limit: LimitQuery = DEFAULT_PAGE_SIZE,
    cursor: CursorQuery = None,
    resources: ResourcesDep,
) -> Response:
    """Every movement of the user's wallet, newest first: top-ups, balance payments and their
    refunds, and campaigns' grants (`reward`), each with its signed amount, the balance it left,
    and the payment, refund, top-up, merchant and campaign it belongs to.

    Paged by keyset on the movement's `version`: pass `next_cursor` as `cursor` until it is
    null; paging to the end returns every movement that existed when paging began exactly
    once. A cursor this API did not issue for a statement is refused with 400
    `invalid_cursor`. A user with an empty wallet has an empty statement."""
    before = decode_statement_cursor(cursor) if cursor is not None else None
    as_of = await resources.freshness.as_of()
    page = await resources.run(
        lambda: handlers.statement_page(
            engine=resources.engine, user_id=user_id, limit=limit, before_version=before
        )
    )
    next_cursor = (
        encode_statement_cursor(page.next_version) if page.next_version is not None else None
    )
    return data_response({"items": page.items, "next_cursor": next_cursor}, as_of)
