"""``GET /v1/users/{user_id}/payments``: a user's own payment history (scope ``users:read``)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from query_service import repository
from query_service.cursor import decode_cursor
from query_service.routes.dependencies import (
    DEFAULT_PAGE_SIZE,
    FORBIDDEN,
    LIST_ERRORS,
    USERS_ROUTE,
    CursorQuery,
    LimitQuery,
    ResourcesDep,
    UserIdPath,
    page_links,
    page_response,
)
from query_service.schemas import PaymentPageOut

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
